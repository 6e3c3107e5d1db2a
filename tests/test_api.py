"""The Python API a user imports: `import near_ray` is light, and every name it lists resolves."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

import near_ray


def test_every_public_name_resolves_to_something_callable():
    for name in near_ray.__all__:
        if name != "__version__":
            assert callable(getattr(near_ray, name)), name


def test_importing_the_package_loads_no_stage_and_no_torch():
    code = ("import sys, near_ray; loaded = [m for m in ('torch', 'ray', 'open_clip', 'near_ray.label.stage') "
            "if m in sys.modules]; print(loaded); sys.exit(1 if loaded else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_unknown_name_is_an_attribute_error():
    try:
        near_ray.run_everything  # noqa: B018
    except AttributeError as e:
        assert "run_everything" in str(e)
    else:
        raise AssertionError("near_ray.run_everything resolved")


def test_read_predictions_from_a_config_gives_one_row_per_image(tmp_path):
    from near_ray.classify.table import SCHEMA

    cfg = near_ray.load_config(None, [f"storage.workdir={tmp_path}"])
    rows = [{"image_id": f"id{i}", "uri": f"/images/{i}.png", "domain": "birds", "name": "Tennessee Warbler",
             "score": 0.9, "source": "clip", "status": "ok", "abstained": False} for i in range(3)]
    folder = tmp_path / "predictions" / "domain=birds"
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist([{c: r.get(c) for c in SCHEMA.names} for r in rows], schema=SCHEMA)
    pq.write_table(table, folder / "part-00000000000000000001-0a1b2c3d.parquet")
    df = near_ray.read_predictions(cfg)
    assert list(df["uri"]) == ["/images/0.png", "/images/1.png", "/images/2.png"]
    assert set(df["name"]) == {"Tennessee Warbler"}
    assert len(near_ray.read_predictions(str(tmp_path / "predictions"))) == 3


def test_the_public_list_and_the_loader_agree():
    assert set(near_ray.__all__) - {"__version__"} == set(near_ray._API)
