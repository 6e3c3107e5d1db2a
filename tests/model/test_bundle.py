import numpy as np
import pytest
from PIL import Image

from near_ray.config import ModelConfig
from near_ray.model.bundle import BundleError, load_bundle
from near_ray.model.clip import create_clip, encode_images, encode_texts


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bundle_roundtrip_predicts_the_same(where, tmp_path, request, write_bundle):
    uri = str(tmp_path / "bundle") if where == "local" else request.getfixturevalue("bucket") + "/bundle"
    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
    vocab = [("Red Finch", "birds"), ("Blue Finch", "birds"), ("Star Lily", "flowers")]
    write_bundle(uri, vocab, clip=clip)  # the names' text embeddings, logit scale 50
    text = encode_texts(clip, [n for n, _ in vocab], "a photo of a {}.")
    images = _images(6)
    expected = (50.0 * encode_images(clip, images) @ text.T).argmax(1)
    b = load_bundle(uri)
    assert (b.predict(images) == expected).all()
    preds = b.classify(images, top_k=2, domain="birds")
    assert all(p.names[0] in ("Red Finch", "Blue Finch") and len(p.names) == 2 for p in preds)
    assert all(abs(sum(p.scores) - 1) < 1e-5 for p in preds)  # only two names in the birds domain
    with pytest.raises(BundleError, match="unknown domain 'cars'"):
        b.classify(images, domain="cars")


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(str(tmp_path))


def test_classify_and_serve_route_a_domain_into_a_bundle_by_one_rule(tmp_path, write_bundle):
    """A domain goes to the bundle's domain of that name, or to a one-domain bundle whatever its name; a
    bundle of several domains without it is refused by classify and serve alike (never its whole vocabulary)."""
    from near_ray.classify.stage import ClassifyError, resolve_targets
    from near_ray.config import DomainConfig, RunConfig, StorageConfig
    from near_ray.errors import NearRayError
    from near_ray.serve.model import load_bundles
    from near_ray.storage import Storage

    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
    vocab = {"two": [("Red Finch", "birds"), ("Star Lily", "flowers")], "one": [("Pickup", "cars")]}
    uris = {}
    for key, entries in vocab.items():
        uris[key] = str(tmp_path / key)
        write_bundle(uris[key], entries, np.eye(len(entries), 128), clip=clip, prompt_template="{}", logit_scale=10.0)

    def classify_route(domain: str, uri: str):
        cfg = RunConfig.model_validate({"storage": {"workdir": str(tmp_path / "run")}, "classify": {"bundles": {domain: uri}}})
        return resolve_targets(cfg, [DomainConfig(name=domain, uri=str(tmp_path / "images"))], Storage())[0][domain].inner

    def serve_route(domain: str, uri: str):
        return load_bundles([(domain, uri)], StorageConfig(), "cpu").routes.route(domain)[1]

    for route in (classify_route, serve_route):
        assert route("birds", uris["two"]) == "birds"
        assert route("vehicles", uris["one"]) == "cars"  # a one-domain bundle, another name
        with pytest.raises(NearRayError, match=r"domain 'insects' is not one of the domains of bundle .*two"):
            route("insects", uris["two"])
    with pytest.raises(ClassifyError):
        classify_route("insects", uris["two"])
