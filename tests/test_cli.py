"""CLI error paths: a bad config or an endpoint that does not answer gives one line naming the file and
field, exit status 2, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from near_ray.cli import main


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _cases(tmp: Path) -> list[tuple[str, list[str], list[str]]]:
    """(what, argv, what the one line must name)."""
    dead = f"http://127.0.0.1:{free_port()}"
    (tmp / "folder.yaml").mkdir()
    (tmp / "latin1.yaml").write_bytes(b"label: {prompt_version: caf\xe9}\n")
    (tmp / "syntax.yaml").write_text("label:\n  samples: [1,\n  temperature: 0.5\n")
    (tmp / "unknown.yaml").write_text("label: {sample: 3}\n")
    (tmp / "wrong_type.yaml").write_text("train: {epochs: many, lr: -1}\n")
    (tmp / "s3.yaml").write_text(f"storage: {{workdir: s3://bucket/run, endpoint_url: '{dead}'}}\n")
    (tmp / "images").mkdir()
    (tmp / "images" / "a.png").write_bytes(b"not decoded by the preflight")
    (tmp / "mllm.yaml").write_text(f"data: {{domains: [{{name: birds, uri: '{tmp / 'images'}'}}]}}\n"
                                   f"label: {{backend: {{type: openai, base_url: '{dead}/v1'}}}}\n")
    return [
        ("missing file", ["refine", "-c", str(tmp / "nope.yaml")], ["nope.yaml", "not found"]),
        ("a folder", ["refine", "-c", str(tmp / "folder.yaml")], ["folder.yaml", "folder"]),
        ("not UTF-8", ["refine", "-c", str(tmp / "latin1.yaml")], ["latin1.yaml", "cannot read"]),
        ("YAML syntax", ["refine", "-c", str(tmp / "syntax.yaml")], ["syntax.yaml", "not valid YAML", "line 4, column 1"]),
        ("unknown field", ["train", "-c", str(tmp / "unknown.yaml")], ["unknown.yaml", "label.sample'"]),
        ("wrong types", ["train", "-c", str(tmp / "wrong_type.yaml")], ["wrong_type.yaml", "train.epochs", "train.lr"]),
        ("unknown field in --set", ["refine", "--set", "refine.kk=3"], ["--set refine.kk=3", "refine.kk"]),
        ("S3 endpoint down", ["refine", "-c", str(tmp / "s3.yaml")], ["s3.yaml", "storage.endpoint_url", dead]),
        ("MLLM endpoint down", ["label", "-c", str(tmp / "mllm.yaml")], ["mllm.yaml", "label.backend.base_url", dead]),
    ]


@pytest.mark.parametrize("index", range(9))
def test_each_bad_config_is_one_line_naming_file_and_field_exit_2_nothing_written(index, tmp_path, monkeypatch, capsys):
    what, argv, named = _cases(tmp_path)[index]
    monkeypatch.chdir(tmp_path)  # the default workdir (near_ray_run) would land here
    before = _files(tmp_path)
    assert main(argv) == 2, what
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, (what, err)
    assert lines[0].startswith(f"near-ray {argv[0]}: error: ")
    for word in named:
        assert word in lines[0], (what, word, lines[0])
    assert out == ""
    assert _files(tmp_path) == before, "nothing written"


def test_the_installed_command_exits_2_with_one_line(tmp_path, repo_root):
    config = tmp_path / "run.yaml"
    config.write_text("refine: {k: [3]}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "near_ray.cli", "refine", "-c", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "run.yaml" in proc.stderr and "refine.k" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_bundle_flag_serves_one_bundle_for_every_domain(tmp_path, monkeypatch):
    """`--bundle URI` wins over a config's per-domain `bundles` (it was silently ignored)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "serve.yaml"
    argv = ["serve", "--write-config", str(out), "--bundle", "s3://b/bundles/v2",
            "--set", 'serve.bundles={"birds": "s3://b/bundles/v1"}']  # fmt: skip
    assert main(argv) == 0
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["bundle"] == "s3://b/bundles/v2" and not args["bundles"]


def test_the_experimental_methods_are_marked_in_the_help_and_said_so_when_trained(monkeypatch, capsys):
    """`near-ray train --help` marks each experimental method; `--method` naming one prints one line on stderr
    (measured, not adopted) and trains it all the same."""
    import argparse

    import near_ray.train.stage as stage
    from near_ray.cli import cmd_train
    from near_ray.config import RunConfig
    from near_ray.train.methods import EXPERIMENTAL, METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert EXPERIMENTAL and all(f"{m} (experimental)" in text for m in EXPERIMENTAL)
    assert all(f"{m} (experimental)" not in text for m in METHODS if m not in EXPERIMENTAL)

    trained = []
    monkeypatch.setattr(stage, "run_train", lambda cfg: trained.append(cfg.train.method) or {})
    cmd_train(argparse.Namespace(cfg=RunConfig(), method=["near", EXPERIMENTAL[0]], pretrain_captions=None))
    err = capsys.readouterr().err.strip().splitlines()
    assert trained == ["near", EXPERIMENTAL[0]]
    assert len(err) == 1 and EXPERIMENTAL[0] in err[0] and "experimental" in err[0] and "docs/method.md" in err[0]
