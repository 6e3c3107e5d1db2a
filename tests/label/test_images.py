"""One decoder for every stage: the MLLM (label), the trainer and embedder (refine/train) and the server
see the same pixels for the same file, whatever its mode or orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from near_ray.config import ImageConfig
from near_ray.images import ImageError, decode_image
from near_ray.storage import Storage


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _tiff(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    return buf.getvalue()


def _rgba() -> bytes:
    arr = np.zeros((24, 32, 4), np.uint8)
    arr[..., 0], arr[..., 3] = 200, 255
    arr[:, :8, 3] = 0  # a transparent band: must come out white everywhere
    return _png(Image.fromarray(arr, "RGBA"))


def _palette() -> bytes:
    im = Image.new("P", (32, 24))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, 16, 24))
    im.info["transparency"] = 0  # index 0 transparent: the right half flattens onto white
    return _png(im, transparency=0)


def _sixteen_bit() -> bytes:
    arr = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 80).astype(np.uint16)
    return _png(Image.fromarray(arr))  # uint16: mode I;16


def _cmyk() -> bytes:
    return _tiff(Image.new("CMYK", (32, 24), (0, 255, 255, 0)))  # pure red in CMYK


def _exif_rotated() -> bytes:
    arr = np.zeros((24, 32, 3), np.uint8)
    arr[:, :4] = (0, 255, 0)  # a green stripe on the left edge
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


CASES = {"rgba": _rgba, "palette": _palette, "16-bit": _sixteen_bit, "cmyk": _cmyk, "exif-rotated": _exif_rotated}


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_refine_train_and_serve_see_identical_pixels(case, tmp_path):
    import open_clip
    import torch

    from near_ray.config import ModelConfig
    from near_ray.label.images import prepare_image
    from near_ray.model.clip import create_clip
    from near_ray.model.preprocess import Preprocessor
    from near_ray.refine.embed import ImageEmbedder
    from near_ray.serve.images import decode_upload
    from near_ray.train.data import _decode_batch

    data = CASES[case]()
    reference = np.asarray(decode_image(data, case))
    assert reference.dtype == np.uint8 and reference.ndim == 3 and reference.shape[2] == 3

    # label: the decoded image, re-encoded losslessly at full size, is what the MLLM receives
    sent = prepare_image(data, ImageConfig(max_side=4096, format="PNG", min_side=1), what=case)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sent.data))), reference)
    # serve: the ingress decodes uploads with the same decoder
    assert np.array_equal(np.asarray(decode_upload(data, 10_000_000, case)), reference)
    # train: decoded, then the model's input pixels (open_clip's eval geometry: short side, centre crop)
    uri = str(tmp_path / f"{case}.bin")
    Storage().write_bytes(uri, data)
    clip = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
    batch = _decode_batch({"idx": np.array([0]), "uri": np.array([uri])}, Storage(), clip.pixels)
    eval_transform = open_clip.image_transform(64, is_train=False, mean=clip.pixels.mean, std=clip.pixels.std)
    expected = eval_transform(Image.fromarray(reference))
    assert torch.equal(Preprocessor(clip.pixels).batch([batch["image"][0]])[0], expected)
    # refine: the embedder's input (its read threads' pixels, normalized per batch) is the same
    embedder = ImageEmbedder(ModelConfig(arch="near-tiny", pretrained="random"), Storage(), max_pixels=10_000_000)
    assert np.array_equal(embedder._load(uri), batch["image"][0])
    assert torch.equal(embedder.preprocessor.batch([embedder._load(uri)])[0], expected)


def test_modes_become_rgb_the_same_way():
    rgba = np.asarray(decode_image(_rgba()))
    assert (rgba[:, :8] == 255).all() and (rgba[:, 8:] == (200, 0, 0)).all()  # transparency onto white
    palette = np.asarray(decode_image(_palette()))
    assert (palette[:, :16] == (0, 0, 255)).all() and (palette[:, 16:] == 255).all()
    grey = np.asarray(decode_image(_sixteen_bit()))
    assert grey.min() == 0 and grey.max() == 255  # 16-bit rescaled to its own range, not clipped
    assert (np.asarray(decode_image(_cmyk())) == (255, 0, 0)).all()
    rotated = np.asarray(decode_image(_exif_rotated()))
    assert rotated.shape[:2] == (32, 24)  # EXIF orientation applied: portrait
    assert rotated[:4, :, 1].mean() > 200 and rotated[-4:, :, 1].mean() < 50  # the stripe is now on top


@pytest.mark.parametrize(("data", "kind"), [(b"", "empty"), (b"plain text, no picture", "not_an_image"),
                                             (_png(Image.new("RGB", (64, 64)))[:60], "corrupt")])
def test_bad_images_name_the_image_and_say_why(data, kind):
    with pytest.raises(ImageError) as err:
        decode_image(data, "s3://bucket/a.png")
    assert err.value.kind == kind and str(err.value).startswith("s3://bucket/a.png: ")


def test_a_decompression_bomb_is_refused_from_its_header():
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2_000, 1_000, 8, 2, 0, 0, 0))
    with pytest.raises(ImageError, match="too large") as err:
        decode_image(header + chunk(b"IEND", b""), "bomb.png", max_pixels=1_000_000, setting="label.image")
    assert err.value.kind == "too_large" and "label.image.max_pixels=1000000" in str(err.value)
