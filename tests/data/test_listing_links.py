"""Listing never leaves the collection: a symbolic link in a domain's folder is followed only when its
target stays inside that folder, and a manifest's local paths obey the same rule.

The link that leaves points at a FIFO: opening it to read would block until a writer comes, so a stage
that read its bytes would hang here (the test's timeout turns that into a failure) instead of passing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from near_ray.config import load_config
from near_ray.data.collections import domain_uris, listing_chunks
from near_ray.storage import Storage


def collection(tmp: Path) -> tuple[Path, Path]:
    """A domain folder with two images, links in and out of it, and a FIFO outside it."""
    from PIL import Image

    root, outside = tmp / "birds", tmp / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "0.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(root / "sub" / "1.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(outside / "other.png")
    os.mkfifo(outside / "secret.png")
    (root / "fifo.png").symlink_to(outside / "secret.png")  # out: a FIFO
    (root / "other.png").symlink_to(outside / "other.png")  # out: an image of another collection
    (root / "escape").symlink_to(outside, target_is_directory=True)  # out: a folder
    (root / "dots.png").symlink_to("../elsewhere/other.png")  # out, by a relative target
    (root / "again.png").symlink_to(root / "0.png")  # in: followed
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # in, but listed already: no loop
    return root, outside


def test_links_out_of_the_folder_are_skipped_and_counted(tmp_path, caplog):
    root, _ = collection(tmp_path)
    with caplog.at_level("WARNING", logger="near_ray.storage"):
        listed = sorted(Path(o.uri).relative_to(root).as_posix() for o in Storage().list(str(root)))
    assert listed == ["0.png", "again.png", "sub/1.png"]
    assert "skipped 4 symbolic links leading out of the folder" in caplog.text


def test_a_manifest_cannot_name_a_path_out_of_the_domain_folder(tmp_path, caplog):
    root, outside = collection(tmp_path)
    manifest = tmp_path / "manifest.parquet"
    Storage().write_parquet(str(manifest), pa.table({"uri": [
        "0.png", "fifo.png", "../elsewhere/other.png", str(outside / "other.png"), "escape/other.png", "sub/1.png"]}))
    cfg = load_config(None, [f"data.domains={json.dumps([{'name': 'birds', 'uri': str(root), 'manifest': str(manifest)}])}"])
    with caplog.at_level("WARNING", logger="near_ray.data.collections"):
        uris = list(domain_uris(cfg.data.domains[0], cfg, Storage()))
    assert [Path(u).name for u in uris] == ["0.png", "1.png"]
    assert "data.domains[birds]: skipped 4 paths of manifest" in caplog.text


@pytest.mark.timeout(600)
def test_the_label_stage_never_reads_a_link_out_of_the_folder(tmp_path, ray_cluster):
    """End to end through the label stage (and so classify's listing, which is the same): the answers are
    about the images inside the folder only, and the FIFO outside was never opened."""
    from near_ray.label.stage import run_label
    from near_ray.label.table import read_labels
    from near_ray.sim.annotator import AnnotatorServer
    from near_ray.sim.synth import generate

    bench = tmp_path / "bench"
    generate(str(bench), ["birds"], species=2, images_per_species=2, image_size=32, seed=0, test_fraction=0.5,
             storage=Storage())
    root = bench / "images" / "birds" / "train"
    inside = sorted(str(p) for p in root.rglob("*.png"))
    os.mkfifo(tmp_path / "secret.png")
    (root / "fifo.png").symlink_to(tmp_path / "secret.png")
    (root / "escape").symlink_to(bench / "images" / "birds" / "test", target_is_directory=True)
    domains = [{"name": "birds", "uri": str(root), "meta_class": "bird"}]
    with AnnotatorServer(str(bench), profile="strong", seed=0) as ann:
        cfg = load_config(None, [f"storage.workdir={tmp_path / 'run'}", f"label.backend.base_url={ann.base_url}",
                                 "label.samples=1", "label.backend.api_key_env=null",
                                 f"data.domains={json.dumps(domains)}"])
        assert sum(len(c) for c in listing_chunks(cfg, Storage())) == len(inside)
        summary = run_label(cfg)
    labels = read_labels(cfg)
    assert sorted(set(labels["uri"])) == inside and summary["mllm_calls"] == len(inside)
    assert set(labels["status"]) <= {"ok", "unparsable"}
