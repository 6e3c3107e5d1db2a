"""The house rules, checked: which package may import what, no import cycles, modules a reader can hold.

Imports are read from the source (every ``import``, lazy ones inside functions included; those under
``if TYPE_CHECKING:`` are annotations only and do not count), so a rule breaks as soon as the code
that would break it is written, not only when a test happens to run it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "near_ray"
# The trainer: what serving, classification and labeling never load. train/methods.py is the
# methods registry, plain data the config validates against, and is not part of it.
TRAINER = ("near_ray.train.loop", "near_ray.train.stage", "near_ray.train.loss", "near_ray.train.data",
           "near_ray.train.runner", "near_ray.train.pretrain", "near_ray.train.checkpoint")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path) -> set[str]:
    """near_ray modules ``path`` imports at run time (module level or inside functions)."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def reachable(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        # importing a.b.c imports the packages a and a.b first
        parts = m.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(edges.get(m, ()))
    return seen


def test_no_import_cycles():
    edges = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    assert cycles == []


def test_serving_and_classification_never_load_the_trainer():
    edges = graph()
    for top in [m for m in edges if m.startswith(("near_ray.serve", "near_ray.model", "near_ray.classify"))]:
        assert not reachable(top, edges) & set(TRAINER), top


def test_only_the_demo_the_cli_and_tests_import_the_simulators():
    allowed = {"near_ray.demo", "near_ray.cli"}
    for module, deps in graph().items():
        if module.startswith("near_ray.sim") or module in allowed:
            continue
        assert not [d for d in deps if d.startswith("near_ray.sim")], module


def test_nothing_imports_the_cli():
    assert [m for m, deps in graph().items() if "near_ray.cli" in deps and m != "near_ray.__main__"] == []


def test_modules_stay_readable():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


@pytest.mark.parametrize("module", ["near_ray.label.stage", "near_ray.label.backends.openai",
                                    "near_ray.label.backends.vllm", "near_ray.cli", "near_ray.model"])
def test_label_stage_and_cli_import_without_torch(module):
    """The label stage runs in a lean vLLM environment: importing it must not pull in torch or open_clip."""
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'open_clip', 'ray.train') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# The pixel spec's one home. Elsewhere, none of: a torchvision/open_clip pixel pipeline, CLIP's normalization
# constants, a mean/std field, key or attribute (what normalizing by a spec reads), or a bundle's old keys.
PIXEL_HOME = PACKAGE / "model" / "preprocess.py"
PIPELINE_CALLS = {"image_transform", "image_transform_v2", "create_model_and_transforms", "Resize", "CenterCrop",
                  "Normalize", "ToTensor", "center_crop"}
SPEC_NAMES = {"mean", "std", "image_mean", "image_std", "OPENAI_DATASET_MEAN", "OPENAI_DATASET_STD",
              "IMAGENET_MEAN", "IMAGENET_STD"}
CLIP_CONSTANTS = (0.48145466, 0.4578275, 0.40821073, 0.26862954, 0.26130258, 0.27577711)


def pixel_spec_definitions(path: Path) -> list[str]:
    """Where ``path`` defines or applies a pixel spec of its own: "line: what"."""
    found = []
    tree = ast.parse(path.read_text())
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in PIPELINE_CALLS:
                what = f"calls {name}()"
        elif isinstance(node, ast.Attribute) and node.attr in SPEC_NAMES and id(node) not in called:
            what = f"reads .{node.attr}"
        elif isinstance(node, ast.Name) and node.id in SPEC_NAMES - {"mean", "std"}:
            what = f"names {node.id}"
        elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) in SPEC_NAMES:
            what = f"declares a field {node.target.id}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in SPEC_NAMES:
            what = f"keys '{node.value}'"
        elif isinstance(node, ast.Constant) and isinstance(node.value, float) and \
                any(abs(node.value - c) < 1e-6 for c in CLIP_CONSTANTS):
            what = f"holds CLIP's normalization constant {node.value}"
        if what:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {what}")
    return found


def test_one_definition_of_the_pixel_spec():
    """Size, normalization, interpolation, resize mode and channels are defined and applied in
    near_ray/model/preprocess.py only: a second pixel path is how training came to squash images
    that every other stage cropped."""
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) if p != PIXEL_HOME for hit in pixel_spec_definitions(p)]
    assert offenders == []
    assert pixel_spec_definitions(PIXEL_HOME)  # the rule sees the home's definitions: it can fail


def test_batch_stages_take_nothing_from_the_server():
    """refine, train, classify and eval get their pixels from near_ray.model, never from near_ray.serve."""
    stages = ("near_ray.label", "near_ray.refine", "near_ray.train", "near_ray.classify", "near_ray.eval")
    edges = graph()
    offenders = {m: sorted(d for d in deps if d.startswith("near_ray.serve"))
                 for m, deps in edges.items() if m.startswith(stages)}
    assert {m: d for m, d in offenders.items() if d} == {}


def _code_strings(path: Path) -> list[str]:
    """String constants of a module, docstrings left out (f-strings contribute their literal pieces)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}  # fmt: skip
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]  # fmt: skip


def _names_a_part(s: str) -> bool:
    """A path piece of a part table: ``domain=<name>`` or ``part-…`` at the start or after a slash (an HTML
    attribute such as ``data-domain=`` is not one)."""
    return any(s.startswith(p) or f"/{p}" in s for p in ("domain=", "part-"))


def test_only_the_part_table_names_part_files():
    """Part files are named, found, replaced and repaired in one place (near_ray/parts): a stage that wrote
    ``domain=<name>/part-…`` files itself would escape the newest-part rule and the resume ledger."""
    naming = [module_name(p) for p in PACKAGE.rglob("*.py") if not module_name(p).startswith("near_ray.parts")
              and any(_names_a_part(s) for s in _code_strings(p))]  # fmt: skip
    assert naming == []


# The compute core: what a GPU box (or a notebook) runs before any cluster image is installed. The Ray
# Data / Train / Serve adapters (the stages, serve.app, train.stage) call into it; it never needs ray.
COMPUTE_CORE = ("near_ray.model.clip", "near_ray.model.preprocess", "near_ray.model.bundle", "near_ray.refine.embed",
                "near_ray.refine.knn", "near_ray.train.loop", "near_ray.train.loss", "near_ray.train.data",
                "near_ray.train.runner", "near_ray.train.methods", "near_ray.eval.metrics", "near_ray.device")


def test_the_compute_core_imports_and_runs_with_ray_unimportable(tmp_path):
    """Embed, exact kNN, a bundle saved, loaded and asked to classify: in a process where `import ray` fails."""
    code = f"""
import sys
sys.modules["ray"] = None  # any `import ray` (or ray.data, ray.train) now raises ImportError
import importlib
for m in {COMPUTE_CORE!r}:
    importlib.import_module(m)
import numpy as np
from PIL import Image
from near_ray.config import ModelConfig
from near_ray.model.bundle import load_bundle, save_bundle
from near_ray.model.clip import create_clip, encode_images, encode_texts
from near_ray.refine.knn import exact_knn
from near_ray.storage import Storage

clip = create_clip(ModelConfig(arch="near-tiny", pretrained="random"))
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(6)]
emb = encode_images(clip, images)
ids, _ = exact_knn(emb, 2)
names = ["Red Finch", "Blue Finch"]
vocab = [{{"name": n, "domain": "birds", "synonyms": [n], "support": 3}} for n in names]
uri = {str(tmp_path / "bundle")!r}
save_bundle(uri, clip, vocab, encode_texts(clip, names, "a photo of a {{}}."), prompt_template="a photo of a {{}}.",
            logit_scale=10.0, storage=Storage())
predicted = load_bundle(uri, Storage()).predict(images, domain="birds")
assert emb.shape[0] == 6 and ids.shape == (6, 2) and len(predicted) == 6
print("core ok without ray")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and "core ok without ray" in out.stdout, out.stdout + out.stderr[-3000:]


PATHS_HOME = PACKAGE / "config"


def artifact_literals(path: Path) -> list[str]:
    """Where ``path`` names an artifact by a string: ``….artifact("…")`` or ``….artifact(f"…")``."""
    return [f"{path.relative_to(ROOT)}:{n.lineno}: artifact({ast.unparse(n.args[0])})"
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "artifact" and n.args
            and (isinstance(n.args[0], ast.JoinedStr)
                 or (isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)))]  # fmt: skip


def test_artifacts_are_named_in_one_place():
    """Every stage finds what another wrote through ``cfg.paths`` (near_ray/config/paths.py): the on-disk
    layout, which resume and existing workdirs depend on, is spelled once, not as strings across the stages."""
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) if PATHS_HOME not in p.parents
                 for hit in artifact_literals(p)]  # fmt: skip
    assert offenders == []
    assert artifact_literals(PATHS_HOME / "paths.py")  # the rule sees the home's names: it can fail


def test_tests_mirror_the_packages():
    """A package's tests live in tests/<package>/ (the top-level modules' in tests/), beside the shared support
    code and the fault suite: a newcomer changing near_ray/<package> finds its tests in one place."""
    tests = ROOT / "tests"
    folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders - {"support", "faults"} <= packages, sorted(folders - {"support", "faults"} - packages)
    assert len(folders & packages) >= 10  # the rule has something to hold
    for module in tests.glob("test_*.py"):  # the top level: tests of near_ray's top-level modules and of the whole
        assert module.stem not in {f"test_{p}" for p in packages}, f"{module.name}: belongs in tests/{module.stem[5:]}/"
