import numpy as np
import pandas as pd
import pytest

from near_ray.config import RunConfig
from near_ray.refine.vocabulary import (
    Vocabulary,
    build_vocabulary,
    clean_surface,
    complete_linkage,
    name_key,
    text_encoder,
)

DEFAULTS = RunConfig().refine
GUARDS = {"min_support": DEFAULTS.min_support, "lexical_guard": DEFAULTS.merge_lexical_guard,
          "min_shared": DEFAULTS.merge_min_shared}


@pytest.fixture(scope="module")
def sbert():
    return text_encoder(RunConfig())  # the offline Sentence-BERT (merge_encoder defaults to sbert)


def _labels(rows, domain="birds"):
    """rows: (image_id, label) or (image_id, label, status)."""
    out = []
    for r in rows:
        image_id, label, status = (*r, "ok") if len(r) == 2 else r
        out.append({"image_id": image_id, "domain": domain, "label": label, "status": status})
    return pd.DataFrame(out)


def test_normalization_is_idempotent():
    raw = ["A photo of a Crimson-barred Warbler.", "the Tennessee Warbler (Leiothlypis peregrina)",
           "  crimson   barred warblers ", "This is a picture of an Amber Anemone!", "Cooper's Hawks", "(x)"]
    for text in raw:
        assert clean_surface(clean_surface(text)) == clean_surface(text)
        assert name_key(name_key(text)) == name_key(text)
    assert clean_surface(raw[0]) == "Crimson-barred Warbler"
    assert clean_surface("(x)") is None
    assert len({name_key(t) for t in raw[:3] if "Crimson" in t or "crimson" in t}) == 1
    assert name_key("Iris") == "iris" and name_key("Hibiscus") == "hibiscus"  # singular words ending in s


def test_spelling_variants_are_one_name_with_the_most_frequent_form():
    labels = _labels([(1, "Crimson-barred Warbler"), (2, "Crimson-barred Warbler"), (3, "crimson barred warbler"),
                      (4, "Crimson-barred Warblers"), (4, "Crimson-barred Warbler"), (5, "Amber Warbler")])
    vocab = build_vocabulary(labels, encode=None, threshold=DEFAULTS.merge_threshold, **GUARDS)
    assert vocab.names("birds") == ["Crimson-barred Warbler", "Amber Warbler"]
    entry = vocab.entries[0]
    assert entry.support == 4  # images, not samples (image 4 said it twice)
    assert set(entry.synonyms) == {"Crimson-barred Warbler", "crimson barred warbler", "Crimson-barred Warblers"}
    assert vocab.canonical("birds", "a photo of a CRIMSON BARRED WARBLER.") == "Crimson-barred Warbler"
    merged = vocab.merges["birds"]["merged"]
    assert merged[0]["canonical"] == "Crimson-barred Warbler" and merged[0]["by"] == "spelling"


def test_siblings_stay_apart_and_synonyms_merge_with_sentence_bert(sbert):
    # Names as the synthetic taxonomy makes them: siblings differ in one attribute word.
    names = {
        "Yellow-brown White-banded Sulphur": 6, "Yellow-brown Yellow-banded Sulphur": 5,  # siblings, cosine 0.98
        "Crimson-barred Warbler": 6, "Crimson-spotted Warbler": 4,  # siblings
        "Warbler": 3,  # a coarse answer
        "Yellow-banded Emperor": 6,
    }
    rows, image = [], 0
    for name, n in names.items():
        for _ in range(n):
            rows.append((image, name))
            image += 1
    # One species, cosine 0.97: another sample of two of the Emperor's images said it this way.
    emperor_images = [i for i, n in rows if n == "Yellow-banded Emperor"]
    rows += [(emperor_images[0], "White Yellow-banded Emperor"), (emperor_images[1], "White Yellow-banded Emperor")]
    vocab = build_vocabulary(_labels(rows), sbert, DEFAULTS.merge_threshold, **GUARDS)
    kept = set(vocab.names("birds"))
    assert kept == set(names) - {"White Yellow-banded Emperor"}
    assert vocab.canonical("birds", "White Yellow-banded Emperor") == "Yellow-banded Emperor"
    emperor = next(e for e in vocab.entries if e.name == "Yellow-banded Emperor")
    assert emperor.support == 6
    record = next(m for m in vocab.merges["birds"]["merged"] if m["canonical"] == "Yellow-banded Emperor")
    assert record["by"] == "embedding" and record["min_similarity"] >= DEFAULTS.merge_threshold


def test_a_qualifier_with_images_of_its_own_is_a_class_not_a_variant(sbert):
    """Two real classes whose names differ by one added word ("minor"): text says they may be one name
    (cosine 0.97, the lexical guard lets an added word through), the images say they are two: each
    name has images of its own. The same pair given to the same images merges."""
    apart = [(i, "Cell with microcracks") for i in range(8)] + [(10 + i, "Cell with minor microcracks") for i in range(8)]
    apart += [(0, "Cell with minor microcracks"), (10, "Cell with microcracks")]  # a little confusion both ways
    vocab = build_vocabulary(_labels(apart), sbert, DEFAULTS.merge_threshold, **GUARDS)
    assert set(vocab.names("birds")) == {"Cell with microcracks", "Cell with minor microcracks"}
    together = [(i, "Cell with microcracks") for i in range(8)] + [(i, "Cell with minor microcracks") for i in range(5)]
    one = build_vocabulary(_labels(together), sbert, DEFAULTS.merge_threshold, **GUARDS)
    assert one.names("birds") == ["Cell with microcracks"]
    assert one.canonical("birds", "Cell with minor microcracks") == "Cell with microcracks"
    # Text similarity alone (no image evidence) would have joined the two classes.
    blind = build_vocabulary(_labels(apart), sbert, DEFAULTS.merge_threshold, **{**GUARDS, "min_shared": 0.0})
    assert len(blind.names("birds")) == 1


def test_without_the_lexical_guard_cosine_alone_would_merge_siblings(sbert):
    rows = [(i, "Yellow-brown White-banded Sulphur") for i in range(3)]
    rows += [(10 + i, "Yellow-brown Yellow-banded Sulphur") for i in range(3)]
    unguarded = build_vocabulary(_labels(rows), sbert, DEFAULTS.merge_threshold, **{**GUARDS, "lexical_guard": False, "min_shared": 0.0})
    guarded = build_vocabulary(_labels(rows), sbert, DEFAULTS.merge_threshold, **{**GUARDS, "min_shared": 0.0})
    assert len(unguarded.entries) == 1 and len(guarded.entries) == 2


def test_complete_linkage_does_not_chain():
    # a~b and b~c are above the threshold, a~c is not: only one pair may merge, not all three.
    a = np.array([1.0, 0.0])
    c = np.array([np.cos(0.8), np.sin(0.8)])
    b = np.array([np.cos(0.4), np.sin(0.4)])
    emb = np.stack([a, b, c]).astype(np.float32)
    groups = complete_linkage(emb, threshold=float(np.cos(0.5)), weights=np.array([1, 5, 1]))
    assert sorted(len(g) for g in groups) == [1, 2]
    assert complete_linkage(emb, threshold=0.99) == [[0], [1], [2]]


def test_min_support_prunes_and_only_ok_rows_count():
    labels = _labels([(1, "Rosy Lotus"), (2, "Rosy Lotus"), (3, "Rosy Lotus"), (3, "Amber Anemone"),
                      (4, "Amber Anemone", "unparsable"), (5, "Ivory Lotus", "mllm_error"), (6, None)])
    vocab = build_vocabulary(labels, None, 0.9, **{**GUARDS, "min_support": 2})
    assert vocab.names() == ["Rosy Lotus"]
    assert vocab.canonical("birds", "Amber Anemone") is None  # pruned (support 1: the unparsable row is not counted)
    assert vocab.merges["birds"]["pruned"] == [{"name": "Amber Anemone", "support": 1, "synonyms": ["Amber Anemone"]}]
    assert vocab.canonical("flowers", "Rosy Lotus") is None  # domains do not share names


def test_domains_are_separate_and_the_json_round_trips():
    labels = pd.concat([_labels([(1, "Rosy Lotus"), (2, "rosy lotus")], "flowers"),
                        _labels([(3, "Crimson Warbler")], "birds")])
    vocab = build_vocabulary(labels, None, 0.9, **GUARDS)
    assert vocab.names("flowers") == ["Rosy Lotus"] and vocab.names("birds") == ["Crimson Warbler"]
    again = Vocabulary.from_json(vocab.to_json(), vocab.merges)
    assert again.canonical("flowers", "ROSY LOTUS") == "Rosy Lotus"
    assert again.canonical("birds", "Rosy Lotus") is None
    assert [e["name"] for e in again.to_json()] == [e["name"] for e in vocab.to_json()]
