"""Vocabulary edits a person writes after the review: each kind changes the vocabulary as it says and is
recorded; a bad edits file is refused with its file and line, before any stage work (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from near_ray.refine.edits import EditsError, check, parse_edits
from near_ray.refine.vocabulary import build_vocabulary
from near_ray.train.stage import edited_names, prune_vocabulary

ROOT = Path(__file__).resolve().parents[2]
GUARDS = {"min_support": 1, "lexical_guard": True, "min_shared": 0.5}


def _labels(rows, domain="birds"):
    return pd.DataFrame([{"image_id": i, "domain": domain, "label": name, "status": "ok"} for i, name in rows])


LABELS = pd.concat([
    _labels([(1, "Sooty Grosbeak"), (2, "Sooty Grosbeak"), (3, "Mountain Grosbeak"), (3, "mountain grosbeaks"),
             (4, "White-crowned Grosbeak"), (5, "Bird"), (6, "Bird"), (6, "Crimson Warbler"), (7, "Crimson Warbler"),
             (8, "Crimson-spotted Warbler")]),
    _labels([(20, "Rosy Lotus"), (21, "Bird")], "flowers"),
])


def _vocab(text, labels=LABELS, encode=None, **kw):
    edits = parse_edits(text, "edits.yaml")
    check(edits, sorted(labels["domain"].unique()))
    return build_vocabulary(labels, encode, 0.9, edits=edits, **{**GUARDS, **kw})


def test_each_kind_changes_the_vocabulary_and_is_recorded():
    vocab = _vocab("""
- rename: Sooty Grosbeak
  to: Sooty Red-crowned Grosbeak
- merge: [White-crowned Grosbeak]
  into: Mountain Grosbeak
  note: one species, two answers
- drop: Crimson-spotted Warbler
- ban: bird
  domain: birds
""")
    assert set(vocab.names("birds")) == {"Sooty Red-crowned Grosbeak", "Mountain Grosbeak", "Crimson Warbler"}
    assert vocab.canonical("birds", "sooty grosbeak") == "Sooty Red-crowned Grosbeak"  # the old answers follow
    assert vocab.canonical("birds", "White-crowned Grosbeak") == "Mountain Grosbeak"
    assert vocab.canonical("birds", "Crimson-spotted Warbler") is None  # dropped: its answers count for nothing
    assert vocab.canonical("birds", "Bird") is None  # banned in birds ...
    assert vocab.canonical("flowers", "Bird") == "Bird"  # ... not in flowers (the edit names its domain)
    mountain = next(e for e in vocab.entries if e.name == "Mountain Grosbeak")
    assert mountain.support == 2 and "White-crowned Grosbeak" in mountain.synonyms
    record = vocab.merges["birds"]
    assert [(a["line"], a["kind"]) for a in record["edits"]] == [(2, "rename"), (4, "merge"), (7, "drop"), (8, "ban")]
    assert next(a for a in record["edits"] if a["kind"] == "ban")["images"] == 2
    assert next(a for a in record["edits"] if a["kind"] == "merge")["note"] == "one species, two answers"
    assert {"name": "Crimson-spotted Warbler", "support": 1, "synonyms": ["Crimson-spotted Warbler"], "by": "edit",
            "edit": 7} in record["pruned"]
    assert "edits" not in vocab.merges["flowers"] or not vocab.merges["flowers"]["edits"]


def test_keep_apart_stops_a_merge_the_text_encoder_would_make_and_protects_both_names():
    def same(names):  # an encoder that finds every pair of names identical
        return np.ones((len(names), 4), dtype=np.float32) / 2

    # "Lesser Crimson Warbler" only adds a modifier: the lexical guard lets it merge; the images agree
    labels = _labels([(1, "Crimson Warbler"), (1, "Lesser Crimson Warbler"), (2, "Crimson Warbler"),
                      (2, "Lesser Crimson Warbler"), (3, "Crimson Warbler")])
    merged = build_vocabulary(labels, same, 0.9, **GUARDS)
    assert merged.names("birds") == ["Crimson Warbler"]
    apart = _vocab("- keep_apart: [Crimson Warbler, Lesser Crimson Warbler]", labels, same, min_support=3)
    assert set(apart.names("birds")) == {"Crimson Warbler", "Lesser Crimson Warbler"}  # kept though support 2 < 3
    kept = edited_names({"applied": apart.merges["birds"]["edits"]})
    assert kept == {("birds", "Crimson Warbler"), ("birds", "Lesser Crimson Warbler")}
    vocabulary = [{"name": "Crimson Warbler", "domain": "birds"}, {"name": "Lesser Crimson Warbler", "domain": "birds"}]
    bundle, pruned = prune_vocabulary(vocabulary, np.array([5, 0]), 1, keep=kept)  # train prunes no edited name
    assert [v["name"] for v in bundle] == ["Crimson Warbler", "Lesser Crimson Warbler"] and pruned == []


def test_a_rename_target_can_be_used_by_later_edits_and_the_fingerprint_ignores_layout():
    text = "- rename: Sooty Grosbeak\n  to: Sooty Red-crowned Grosbeak\n- merge: [Sooty Red-crowned Grosbeak]\n  into: Mountain Grosbeak\n"
    vocab = _vocab(text)
    assert vocab.canonical("birds", "Sooty Grosbeak") == "Mountain Grosbeak"
    moved = "# reviewed\n\n" + text.replace("Sooty Grosbeak", "sooty grosbeaks")
    assert parse_edits(moved, "b.yaml").fingerprint == parse_edits(text, "a.yaml").fingerprint
    assert parse_edits(text + "- drop: Bird\n", "a.yaml").fingerprint != parse_edits(text, "a.yaml").fingerprint


@pytest.mark.parametrize(("text", "line", "says"), [
    ("- rename: Sooty Grosbeak\n  to: X\n- renmae: Bird\n  to: Y\n", 3, "unknown edit kind 'renmae' (did you mean 'rename'?)"),
    ("- drop: Bird\n- drop: Sooty Grosbek\n", 2, "no name 'Sooty Grosbek' in any domain (did you mean 'Sooty Grosbeak'?)"),
    ("- drop: Mountain Grosbeak\n- merge: [White-crowned Grosbeak]\n  into: Mountain Grosbeak\n", 2,
     "merge into 'Mountain Grosbeak', which line 1 drops"),
    ("- rename: Sooty Grosbeak\n  to: X\n- merge: [X]\n  into: Sooty Grosbeak\n", 3, "cycle"),
    ("- rename: Sooty Grosbeak\n  to: Mountain Grosbeak\n", 1, "use merge"),
    ("- merge: [Sooty Grosbeak]\n  into: Mountain Grosbeak\n- keep_apart: [Sooty Grosbeak, Mountain Grosbeak]\n", 3,
     "the edits make them one name"),
    ("- ban: Bird\n- rename: Bird\n  to: Any Bird\n", 2, "banned on line 1"),
    ("- drop: Bird\n  domain: bird\n", 1, "domain 'bird' is not one of the run's domains (birds, flowers) (did you mean"),
    ("- rename: Bird\n  into: Y\n", 2, "'into' is not a field of a rename edit"),
    ("rename: Bird\n", 1, "an edits file is a list of edits"),
    ("- drop: [Bird\n", 2, "not valid YAML"),
])
def test_a_bad_edit_names_the_file_and_line(text, line, says):
    with pytest.raises(EditsError) as e:
        _vocab(text)
    assert str(e.value).startswith(f"edits.yaml:{line}: ") and says in str(e.value), str(e.value)


@pytest.mark.parametrize("command", ["refine", "train", "run"])
def test_a_bad_edits_file_fails_before_ray_starts(tmp_path, command):
    """RAY_ADDRESS points at nothing: a command that started or joined Ray would fail on that, not on the edits."""
    edits = tmp_path / "edits.yaml"
    edits.write_text("- rename: Sooty Grosbeak\n  to: Sooty Red-crowned Grosbeak\n- dorp: Bird\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"workdir": str(tmp_path / "work")},
                                   "data": {"domains": [{"name": "birds", "uri": str(tmp_path)}]},
                                   "model": {"arch": "near-tiny"}, "label": {"backend": {"type": "openai", "api_key_env": None}}}))
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "near_ray", command, "-c", str(cfg), "--edits", str(edits)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"{edits}:3: unknown edit kind 'dorp' (did you mean 'drop'?)" in out.stderr
    assert "Traceback" not in out.stderr
