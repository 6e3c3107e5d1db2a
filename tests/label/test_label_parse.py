"""Answer parsing, prompts, image validation and the resume ledger: no Ray, no network."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from near_ray.config import ImageConfig
from near_ray.images import ImageError
from near_ray.label.images import image_id, prepare_image
from near_ray.label.parse import parse_answer
from near_ray.label.prompts import LABEL_SCHEMA, PromptError, prompt_for, sample_seed, schema_text
from near_ray.names import title_case

ANSWERS = [
    # structured output
    ('{"name": "Tennessee Warbler"}', "Tennessee Warbler"),
    ('{"name": "tennessee warbler"}', "Tennessee Warbler"),
    ('```json\n{"name": "Tennessee Warbler"}\n```', "Tennessee Warbler"),
    ('{"species": "Tennessee Warbler", "confidence": 0.8}', "Tennessee Warbler"),
    ('{"name": "This appears to be a Tennessee Warbler."}', "Tennessee Warbler"),
    ('{"name": ""}', None),
    ('{"confidence": 0.3}', None),
    # sentences, scientific names, markdown, quotes
    ("This appears to be a Tennessee Warbler (Leiothlypis peregrina).", "Tennessee Warbler"),
    ("It is likely a tennessee warbler.", "Tennessee Warbler"),
    ("This is most likely a Wilson's Warbler", "Wilson's Warbler"),
    ("The bird in the image is an Orange-Crowned Warbler.", "Orange-crowned Warbler"),
    ("I think it's a Tennessee Warbler.", "Tennessee Warbler"),
    ("Based on the plumage, Tennessee Warbler", "Tennessee Warbler"),
    ("a photo of a Tennessee Warbler", "Tennessee Warbler"),
    ("An image of an American Robin", "American Robin"),
    ("**Tennessee Warbler**", "Tennessee Warbler"),
    ('"Tennessee Warbler"', "Tennessee Warbler"),
    ("“Tennessee Warbler”", "Tennessee Warbler"),
    ("Answer: Tennessee Warbler", "Tennessee Warbler"),
    ("Tennessee Warbler (Leiothlypis peregrina)", "Tennessee Warbler"),
    ("This image shows a Tennessee Warbler perched on a branch. It has olive plumage.", "Tennessee Warbler"),
    ("The Black-and-white Warbler", "Black-and-white Warbler"),
    ("Warbler.", "Warbler"),
    # lists: the first candidate
    ("Possibly: Tennessee Warbler, Orange-crowned Warbler", "Tennessee Warbler"),
    ("Tennessee Warbler or Nashville Warbler", "Tennessee Warbler"),
    ("1. Tennessee Warbler\n2. Nashville Warbler", "Tennessee Warbler"),
    ("Possibly one of:\n- Tennessee Warbler\n- Nashville Warbler", "Tennessee Warbler"),
    # casing
    ("tennessee warbler", "Tennessee Warbler"),
    ("TENNESSEE WARBLER", "Tennessee Warbler"),
    ("BMW M3 Coupe 2012", "BMW M3 Coupe 2012"),
    # refusals and empty answers
    ("I cannot determine the species from this image.", None),
    ("I'm sorry, but I can't identify the exact species in this image.", None),
    ("Sorry, I can't help with that.", None),
    ("Unable to identify.", None),
    ("Unknown", None),
    ("It's hard to tell, but it looks like a Tennessee Warbler.", "Tennessee Warbler"),
    ("", None),
    ("   ", None),
    (None, None),
    ("...", None),
    # JSON cut off (max_tokens) or broken: a complete name field survives, JSON text never becomes a name
    ('{"name', None),
    ('{"name": "Tennessee Warb', None),
    ('{"name": "Tennessee Warbler", "conf', "Tennessee Warbler"),
    ('{"species": ["Tennessee Warbler", "Nashville Warb', "Tennessee Warbler"),
    ('["Tenn', None),
    ('```json\n{"name": "Tennessee Warbler",\n```', "Tennessee Warbler"),
]


@pytest.mark.parametrize(("raw", "expected"), ANSWERS)
def test_parse_answer_extracts_the_name(raw, expected):
    assert parse_answer(raw) == expected


def test_surface_forms_of_one_name_normalize_to_one_string():
    forms = ["tennessee warbler", "Tennessee warbler", "TENNESSEE WARBLER", "**Tennessee Warbler**.", "a Tennessee Warbler"]
    assert {parse_answer(f) for f in forms} == {"Tennessee Warbler"}
    assert title_case("orange-CROWNED warbler") == "Orange-crowned Warbler"


def test_prompt_names_the_meta_class_and_is_versioned():
    system, user = prompt_for("bird", "v1")
    assert system and "bird" in user and "most specific name" in user
    _, generic = prompt_for(None, "v1")
    assert "bird" not in generic and "name" in generic
    with pytest.raises(PromptError, match="v9"):
        prompt_for("bird", "v9")
    assert json.loads(schema_text(True)) == LABEL_SCHEMA
    assert schema_text(False) == ""


def test_sample_seeds_are_stable_and_distinct():
    seeds = {sample_seed(0, "abc", s) for s in range(5)}
    assert len(seeds) == 5
    assert sample_seed(0, "abc", 1) == sample_seed(0, "abc", 1)
    assert sample_seed(1, "abc", 1) != sample_seed(0, "abc", 1)


# ------------------------------------------------------------------------------------------ images
def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb_and_fits_max_side(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = _encode(_noise(120, 60, mode), fmt)
    out = prepare_image(data, ImageConfig(max_side=48, format="PNG"))
    im = Image.open(io.BytesIO(out.data))
    assert im.mode == "RGB" and out.mime == "image/png"
    assert max(im.size) == 48 and im.size == (48, 24)


def test_exif_orientation_is_applied():
    im = _noise(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    out = prepare_image(_encode(im, "JPEG", exif=exif), ImageConfig(max_side=448))
    assert Image.open(io.BytesIO(out.data)).size == (40, 80)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty file"),
        (b"this is a text file, not a picture", "not an image"),
        (_encode(_noise(64, 64))[:200], "truncated or corrupt"),
        (_encode(_noise(4, 4)), "too small"),
    ],
)
def test_bad_images_are_rejected_with_the_problem(data, problem):
    with pytest.raises(ImageError, match=problem):
        prepare_image(data, ImageConfig(min_side=8))


def test_decompression_bomb_is_rejected_from_its_header():
    # A 1-bit PNG claiming 5000x5000 pixels compresses to a few kB; it must never be decoded.
    bomb = _encode(Image.new("1", (5000, 5000)))
    assert len(bomb) < 50_000
    with pytest.raises(ImageError, match="too large"):
        prepare_image(bomb, ImageConfig(max_pixels=1_000_000))


def test_image_id_is_a_content_hash():
    a = _encode(_noise(16, 16))
    assert image_id(a) == image_id(bytes(a)) and len(image_id(a)) == 20
    assert image_id(a) != image_id(a + b"\0")
