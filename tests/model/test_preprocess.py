"""One pixel path: every stage turns the same file into the same pixels and the same embedding.

A non-square photo and a greyscale one go through train's dataset, refine's embedder, classify's
read tasks and tower, the server's ingress and model, and evaluation, with one bundle of the same
weights (fp32 on the CPU). Before the pixel path was one, training squashed such a photo to a square
while the other stages cropped its centre: the model was tested on other pixels than it learned from.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from near_ray.config import DomainConfig, ModelConfig, RunConfig, ServeConfig, StorageConfig
from near_ray.images import decode_image
from near_ray.model.preprocess import PixelSpec, Preprocessor, bundle_pixel_spec, encode_pixels, precision
from near_ray.storage import Storage, join

VOCAB = [{"name": n, "domain": "birds", "synonyms": [n], "support": 1} for n in ("red tit", "blue tit", "gold tit")]


def _photo(width: int, height: int, mode: str) -> bytes:
    """Stripes across the long side: a squash and a centre crop give visibly different pixels."""
    rng = np.random.default_rng(width * height)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    arr[:, : width // 4] = (250, 20, 20)  # only the squash keeps the outer quarters
    arr[:, -width // 4 :] = (20, 20, 250)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory, write_bundle) -> str:
    return write_bundle(str(tmp_path_factory.mktemp("bundle") / "b"), VOCAB)


@pytest.fixture
def one_thread():
    """Every stage in this process on one torch thread, as refine's and classify's actors set theirs: a CPU
    matmul's reduction order (and so its last bit) depends on the thread count, not on the pixel path."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited")  # the Serve wrapper's async __del__
@pytest.mark.parametrize(("width", "height", "mode"), [(96, 64, "RGB"), (64, 96, "RGB"), (96, 64, "L")])
def test_every_stage_sees_the_same_pixels_and_embedding(width, height, mode, bundle_uri, tmp_path, one_thread):
    import torch

    from near_ray.classify.stage import resolve_targets
    from near_ray.classify.tower import ImageTower, read_images
    from near_ray.eval.stage import bundle_predictions
    from near_ray.model.bundle import load_bundle
    from near_ray.refine.embed import ImageEmbedder
    from near_ray.serve.api import Ingress
    from near_ray.serve.requests import Upload
    from near_ray.train.data import TrainPixels, _decode_batch, to_pixels

    data = _photo(width, height, mode)
    uri = str(tmp_path / "photo.png")
    st = Storage()
    st.write_bytes(uri, data)
    bundle = load_bundle(bundle_uri)
    spec = bundle.pixels
    assert spec == PixelSpec(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # near-tiny's, through the bundle
    prep = Preprocessor(spec)
    pixels = prep.pixels(decode_image(data))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    embedding = encode_pixels(bundle.clip.model, prep.batch([pixels]), "cpu")
    probs = bundle.probabilities(embedding, "birds")[0]
    squashed = np.asarray(decode_image(data).resize((64, 64), Image.BICUBIC))
    assert np.abs(squashed.astype(int) - pixels).mean() > 20  # the crop differs from a squash

    # train: the dataset's pixels and, without augmentation, the model's input
    batch = _decode_batch({"idx": np.array([0]), "uri": np.array([uri])}, st, spec)
    assert np.array_equal(batch["image"][0], pixels)
    x = to_pixels(torch.as_tensor(batch["image"]), torch.arange(1), TrainPixels(spec, augment=False), 0, 0)
    assert torch.equal(x, prep.batch([pixels]))
    assert np.array_equal(encode_pixels(bundle.clip.model, x, "cpu"), embedding)

    # refine: the embedder's read threads and its batch
    embedder = ImageEmbedder(ModelConfig(arch="near-tiny", pretrained="random"), st, max_pixels=10_000_000)
    assert np.array_equal(embedder._load(uri), pixels)
    out = embedder({"image_id": np.array(["a"]), "uri": np.array([uri]), "domain": np.array(["birds"])})
    assert out["error"][0] == "" and np.array_equal(out["embedding"], embedding)

    # classify: the targets read from the bundle's config.json, the read task's pixels, the tower's probabilities
    cfg = RunConfig()
    cfg.classify.bundle = bundle_uri
    targets, _ = resolve_targets(cfg, [DomainConfig(name="birds", uri=str(tmp_path))], st)
    assert targets["birds"].spec == spec
    rows = read_images(pa.Table.from_pylist([{"uri": uri, "domain": "birds"}]), storage=st, targets=targets,
                       ledger=None, max_pixels=10_000_000, min_side=1)
    assert np.array_equal(np.frombuffer(rows["pixels"][0].as_py(), np.uint8).reshape(64, 64, 3), pixels)
    tower = ImageTower(targets, st, top_k=3, abstain_threshold=None, temperatures={}, threads=1, with_probs=True)
    assert np.array_equal(np.asarray(tower(rows)["probs"][0].as_py(), np.float32), probs.astype(np.float32))

    # serve: the ingress's pixels, the model replica's scores (the model held in the ingress, serve.colocate;
    # the deployment class built as Serve builds a replica, without a cluster)
    async def serve_one() -> tuple[np.ndarray, dict]:
        ingress = Ingress.func_or_class.__new__(Ingress.func_or_class)
        await ingress.__init__(None, ServeConfig(), StorageConfig())
        await ingress.reconfigure({"bundle": bundle_uri})
        described = await ingress._describe()
        served_spec = ingress._spec_for(described, "birds")
        _, served = ingress._prepare(Upload("file 'photo.png'", data), served_spec)
        item = {"pixels": served, "domain": "birds", "top_k": 3, "key": served_spec["key"]}
        return served, await ingress.model.classify.remote(item)

    served, answer = asyncio.run(serve_one())
    assert np.array_equal(served, pixels)
    assert [p["score"] for p in answer["predictions"]] == sorted(probs.tolist(), reverse=True)

    # eval: the bundle's own embed, through evaluation's reads
    import pandas as pd

    kept: dict[str, list] = {"near": []}
    preds, _, bad = bundle_predictions(cfg, {"near": bundle}, pd.DataFrame({"uri": [uri], "domain": ["birds"]}), st,
                                       kept)
    assert bad == [] and np.array_equal(kept["near"][0], probs)
    assert np.array_equal(bundle.embed([decode_image(data)]), embedding)


def test_the_preprocessor_is_open_clips_eval_transform():
    """The split (uint8 geometry, then normalization in the batch) gives open_clip's pixels exactly."""
    import open_clip
    import torch

    spec = PixelSpec(64, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    prep = Preprocessor(spec)
    for data in (_photo(96, 64, "RGB"), _photo(50, 130, "RGB"), _photo(96, 64, "L")):
        image = decode_image(data)
        want = open_clip.image_transform(64, is_train=False, mean=spec.mean, std=spec.std)(image)
        assert torch.equal(prep.batch([prep.pixels(image)])[0], want)
    squash = PixelSpec(64, resize_mode="squash", interpolation="bilinear")
    image = decode_image(_photo(96, 64, "RGB"))
    want = open_clip.image_transform(64, is_train=False, resize_mode="squash", interpolation="bilinear")(image)
    assert torch.equal(Preprocessor(squash).batch([Preprocessor(squash).pixels(image)])[0], want)


def test_a_bundle_written_before_the_spec_was_stored_whole_still_loads(bundle_uri, tmp_path):
    """Older bundles kept only image_mean/image_std (and the size in the model config): they load, classify
    and serve exactly as they did (bicubic, shortest side, centre crop)."""
    import shutil

    from near_ray.classify.stage import resolve_targets
    from near_ray.model.bundle import load_bundle

    old = str(tmp_path / "old")
    shutil.copytree(bundle_uri, old)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    spec = config.pop("preprocess")
    config["image_mean"], config["image_std"] = spec["mean"], spec["std"]
    config["model_config"]["preprocess_cfg"] = {"mean": spec["mean"], "std": spec["std"]}
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    new, legacy = load_bundle(bundle_uri), load_bundle(old)
    assert legacy.pixels == new.pixels == bundle_pixel_spec(config)
    assert (legacy.pixels.interpolation, legacy.pixels.resize_mode, legacy.pixels.channels) == ("bicubic", "shortest", "RGB")
    images = [decode_image(_photo(96, 64, "RGB")), decode_image(_photo(64, 96, "L"))]
    assert np.array_equal(legacy.embed(images), new.embed(images))
    cfg = RunConfig()
    cfg.classify.bundle = old
    targets, _ = resolve_targets(cfg, [DomainConfig(name="birds", uri=str(tmp_path))], Storage())
    assert targets["birds"].spec == new.pixels


def test_a_bundle_with_a_spec_near_ray_cannot_apply_is_refused_naming_the_field(bundle_uri, tmp_path):
    import shutil

    from near_ray.classify.stage import resolve_targets
    from near_ray.model.bundle import BundleError, load_bundle

    bad = str(tmp_path / "bad")
    shutil.copytree(bundle_uri, bad)
    config = Storage().read_json(join(bad, "config.json"))
    config["preprocess"]["resize_mode"] = "longest"
    Storage().write_json(join(bad, "config.json"), config)
    with pytest.raises(BundleError, match=r"bad.*config\.json.*resize_mode 'longest'"):
        load_bundle(bad)
    cfg = RunConfig()
    cfg.classify.bundle = bad
    with pytest.raises(BundleError, match=r"config\.json.*resize_mode 'longest'"):
        resolve_targets(cfg, [DomainConfig(name="birds", uri=str(tmp_path))], Storage())


def test_one_precision_rule_per_device():
    """fp32 on a CPU, fp16 autocast on any CUDA device, however the device is named."""
    import torch

    assert precision("cpu") == precision(torch.device("cpu")) == "float32"
    assert precision("cuda") == precision("cuda:1") == precision(torch.device("cuda", 0)) == "float16-autocast"
