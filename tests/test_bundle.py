import numpy as np
import pytest
from PIL import Image

from near_ray.config import ModelConfig
from near_ray.model.bundle import BundleError, load_bundle, save_bundle
from near_ray.model.clip import create_clip, encode_images, encode_texts


def _images(n):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_bundle_roundtrip_predicts_the_same(where, tmp_path, request):
    uri = str(tmp_path / "bundle") if where == "local" else request.getfixturevalue("bucket") + "/bundle"
    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
    vocab = [{"name": n, "domain": d, "synonyms": [], "support": 1} for n, d in
             [("Red Finch", "birds"), ("Blue Finch", "birds"), ("Star Lily", "flowers")]]
    text = encode_texts(clip, [v["name"] for v in vocab], "a photo of a {}.")
    save_bundle(uri, clip, vocab, text, prompt_template="a photo of a {}.", logit_scale=50.0)
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
