"""Dataset readers on tiny trees written here in each benchmark's native layout (local and moto S3)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from near_ray.data.readers import (
    DatasetError,
    detect_layout,
    discovery_set,
    flowers102_names,
    read_dataset,
)
from near_ray.storage import Storage, join


def _png(color: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _mat(**arrays) -> bytes:
    buf = io.BytesIO()
    sio.savemat(buf, arrays)
    return buf.getvalue()


def _cells(values: list[str]) -> np.ndarray:
    return np.array([[v] for v in values], dtype=object)


class Tree:
    """Writes files below a root through Storage, so the same tree builder serves local and s3://."""

    def __init__(self, root: str, storage: Storage):
        self.root, self.st = root, storage

    def put(self, rel: str, data: bytes | str) -> None:
        self.st.write_bytes(join(self.root, rel), data.encode() if isinstance(data, str) else data)


def write_cub(tree: Tree) -> None:
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    images, labels, split = [], [], []
    n = 0
    for c, folder in enumerate(classes, start=1):
        for k in range(4):
            n += 1
            rel = f"{folder}/{folder[4:]}_{k}.jpg"
            tree.put(f"images/{rel}", _png(n))
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c}")
            split.append(f"{n} {1 if k < 3 else 0}")
    tree.put("images.txt", "\n".join(images) + "\n")
    tree.put("image_class_labels.txt", "\n".join(labels) + "\n")
    tree.put("train_test_split.txt", "\n".join(split) + "\n")
    tree.put("classes.txt", "\n".join(f"{i} {c}" for i, c in enumerate(classes, start=1)) + "\n")


def write_cars(tree: Tree) -> None:
    names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]], dtype=object)
    dt = [("bbox_x1", "O"), ("class", "O"), ("fname", "O")]

    def annos(classes: list[int]) -> np.ndarray:
        a = np.zeros((1, len(classes)), dtype=dt)
        for i, c in enumerate(classes):
            a[0, i] = (np.array([[1]]), np.array([[c]], dtype=np.uint8), np.array([f"{i + 1:05d}.jpg"]))
        return a

    tree.put("devkit/cars_meta.mat", _mat(class_names=names))
    tree.put("devkit/cars_train_annos.mat", _mat(annotations=annos([1, 2, 2])))
    tree.put("cars_test_annos_withlabels.mat", _mat(annotations=annos([2, 1])))
    for i in range(3):
        tree.put(f"cars_train/{i + 1:05d}.jpg", _png(i))
    for i in range(2):
        tree.put(f"cars_test/{i + 1:05d}.jpg", _png(i))


def write_dogs(tree: Tree) -> None:
    train = ["n02085620-Chihuahua/n02085620_1.jpg", "n02085782-Japanese_spaniel/n02085782_1.jpg"]
    test = ["n02085620-Chihuahua/n02085620_2.jpg"]
    for rel in train + test:
        tree.put(f"Images/{rel}", _png())
    tree.put("train_list.mat", _mat(file_list=_cells(train), labels=np.array([[1], [2]])))
    tree.put("test_list.mat", _mat(file_list=_cells(test), labels=np.array([[1]])))


def write_flowers(tree: Tree) -> None:
    tree.put("imagelabels.mat", _mat(labels=np.array([[1, 1, 77, 102, 77]])))
    tree.put("setid.mat", _mat(trnid=np.array([[1, 3]]), valid=np.array([[4]]), tstid=np.array([[2, 5]])))
    for i in range(1, 6):
        tree.put(f"jpg/image_{i:05d}.jpg", _png(i))


def write_pets(tree: Tree) -> None:
    tree.put("annotations/trainval.txt", "Abyssinian_1 1 1 1\namerican_bulldog_10 2 2 1\n")
    tree.put("annotations/test.txt", "#Image CLASS-ID SPECIES BREED ID\nAbyssinian_2 1 1 1\n")
    for stem in ("Abyssinian_1", "american_bulldog_10", "Abyssinian_2"):
        tree.put(f"images/{stem}.jpg", _png())


@pytest.fixture
def local(tmp_path: Path) -> Tree:
    return Tree(str(tmp_path / "ds"), Storage())


def test_cub200_native_layout(local: Tree) -> None:
    write_cub(local)
    table = read_dataset("cub200", local.root, local.st)
    assert len(table) == 8
    assert set(table["class_name"]) == {"Black footed Albatross", "Laysan Albatross"}
    assert (table["split"] == "train").sum() == 6 and (table["split"] == "test").sum() == 2
    assert (table["domain"] == "birds").all()
    assert all(Path(u).is_file() for u in table["uri"])  # every URI points at a real image
    assert detect_layout(local.root, local.st) == "cub200"


def test_a_domain_with_a_layout_names_the_datasets_own_images_and_evaluates_on_its_test_split(local: Tree) -> None:
    from near_ray.config import RunConfig
    from near_ray.data.collections import check_domains, domain_uris
    from near_ray.eval.stage import load_test_sets

    write_cub(local)
    local.put("images/notes/scan_of_the_field_guide.png", _png())  # an image the dataset does not list
    cfg = RunConfig.model_validate({"data": {"domains": [
        {"name": "birds", "uri": local.root, "layout": "CUB_200_2011", "split": "train"}]}})
    d = cfg.data.domains[0]
    assert d.layout == "cub200" and d.has_truth and not d.truth
    check_domains(cfg, local.st)
    named = list(domain_uris(d, cfg, local.st))
    assert len(named) == 6 and all(Path(u).is_file() for u in named)  # the train split's 6, not the stray scan
    test = load_test_sets(cfg, local.st)  # the truth is the dataset's own class names, of its test split
    assert len(test) == 2 and not set(test["uri"]) & set(named)
    assert set(test["species"]) == {"Black footed Albatross", "Laysan Albatross"}
    every = list(domain_uris(d.model_copy(update={"split": None}), cfg, local.st))
    assert len(every) == 8


def test_a_layout_is_checked_where_the_config_is_read() -> None:
    from near_ray.config import RunConfig

    def domain(**extra):
        return RunConfig.model_validate({"data": {"domains": [{"name": "birds", "uri": "/data/birds", **extra}]}})

    with pytest.raises(Exception, match="unknown dataset layout 'inat'"):
        domain(layout="inat")
    with pytest.raises(Exception, match="set one of layout and manifest"):
        domain(layout="cub200", manifest="/data/birds.parquet")
    with pytest.raises(Exception, match="split needs a layout"):
        domain(split="train")
    assert not domain().data.domains[0].has_truth and not domain(layout="unlabeled").data.domains[0].has_truth
    assert not domain(layout="auto").data.domains[0].has_truth  # named layouts only: a no-label run stays one


def test_cub200_accepts_the_unpacked_parent_folder(tmp_path: Path) -> None:
    tree = Tree(str(tmp_path / "ds" / "CUB_200_2011"), Storage())
    write_cub(tree)
    table = read_dataset("auto", str(tmp_path / "ds"), tree.st)
    assert len(table) == 8 and table.attrs["layout"] == "cub200"


def test_stanford_cars_devkit_layout(local: Tree) -> None:
    write_cars(local)
    table = read_dataset("auto", local.root, local.st)
    assert table.attrs["layout"] == "stanford_cars"
    train = table[table["split"] == "train"].sort_values("uri")
    assert list(train["class_name"]) == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura RL Sedan 2012"]
    test = table[table["split"] == "test"].sort_values("uri")
    assert list(test["class_name"]) == ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"]
    assert all(Path(u).is_file() for u in table["uri"])


def test_stanford_cars_without_labeled_test_annotations_names_the_file(local: Tree) -> None:
    write_cars(local)
    Path(local.root, "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match="cars_test_annos_withlabels.mat"):
        read_dataset("stanford_cars", local.root, local.st)


def test_stanford_dogs_lists(local: Tree) -> None:
    write_dogs(local)
    table = read_dataset("dogs", local.root, local.st)
    assert detect_layout(local.root, local.st) == "stanford_dogs"
    assert sorted(zip(table["class_name"], table["split"], strict=True)) == [
        ("Chihuahua", "test"),
        ("Chihuahua", "train"),
        ("Japanese spaniel", "train"),
    ]


def test_flowers102_splits_and_shipped_names(local: Tree) -> None:
    write_flowers(local)
    table = read_dataset("auto", local.root, local.st).sort_values("uri")
    names = flowers102_names()
    assert len(names) == 102 and len(set(names)) == 102
    assert list(table["class_name"]) == [names[0], names[0], names[76], names[101], names[76]]
    assert list(table["split"]) == ["train", "test", "train", "val", "test"]


def test_oxford_pets_names_from_file_stems(local: Tree) -> None:
    write_pets(local)
    table = read_dataset("auto", local.root, local.st)
    assert table.attrs["layout"] == "oxford_pets"
    assert sorted(zip(table["class_name"], table["split"], strict=True)) == [
        ("Abyssinian", "test"),
        ("Abyssinian", "train"),
        ("American Bulldog", "train"),
    ]


def test_folder_layouts_with_and_without_splits(tmp_path: Path) -> None:
    st = Storage()
    flat = Tree(str(tmp_path / "flat"), st)
    for c in ("red_fox", "arctic_fox"):
        for i in range(2):
            flat.put(f"{c}/{i}.png", _png(i))
    table = read_dataset("auto", flat.root, st)
    assert table.attrs["layout"] == "folder"
    assert set(table["class_name"]) == {"red fox", "arctic fox"} and (table["split"] == "").all()
    assert (table["domain"] == "flat").all()

    split = Tree(str(tmp_path / "split"), st)
    split.put("train/a/0.png", _png())
    split.put("test/a/1.png", _png())
    split.put("val/b/2.jpg", _png())
    table = read_dataset("folder", split.root, st, domain="things")
    assert sorted(zip(table["class_name"], table["split"], strict=True)) == [
        ("a", "test"),
        ("a", "train"),
        ("b", "val"),
    ]
    assert (table["domain"] == "things").all()


def test_unlabeled_folder(tmp_path: Path) -> None:
    tree = Tree(str(tmp_path / "pile"), Storage())
    tree.put("x.png", _png())
    tree.put("sub/y.jpg", _png())
    tree.put("notes.txt", "not an image")
    table = read_dataset("auto", tree.root, tree.st)
    assert table.attrs["layout"] == "unlabeled"
    assert len(table) == 2 and table["class_name"].isna().all()


def test_unknown_layout_and_empty_root_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset layout 'imagenet'"):
        read_dataset("imagenet", str(tmp_path), Storage())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        read_dataset("auto", str(tmp_path / "empty"), Storage())
    with pytest.raises(DatasetError, match=r"not a cub200.*images\.txt"):
        read_dataset("cub200", str(tmp_path / "empty"), Storage())


def test_cub200_with_an_image_missing_from_the_label_file_names_it(local: Tree) -> None:
    write_cub(local)
    local.put("image_class_labels.txt", "1 1\n")
    with pytest.raises(DatasetError, match=r"image 2 \(001.Black_footed_Albatross/"):
        read_dataset("cub200", local.root, local.st)


def test_discovery_set_is_seeded_per_class_and_from_train(local: Tree) -> None:
    write_cub(local)
    table = read_dataset("cub200", local.root, local.st)
    a = discovery_set(table, per_class=2, seed=0)
    assert len(a) == 4 and (a["split"] == "train").all()
    assert a["class_name"].value_counts().to_dict() == {"Black footed Albatross": 2, "Laysan Albatross": 2}
    assert a.equals(discovery_set(table, per_class=2, seed=0))
    seeds = {tuple(discovery_set(table, per_class=1, seed=s)["uri"]) for s in range(8)}
    assert len(seeds) > 1  # the seed changes which images are picked
    everything = discovery_set(table, per_class=10)
    assert len(everything) == 6  # a class with fewer images gives all of its train images


def test_cub200_and_stanford_dogs_on_s3(bucket: str) -> None:
    st = Storage()
    write_cub(Tree(f"{bucket}/cub", st))
    write_dogs(Tree(f"{bucket}/dogs", st))
    cub = read_dataset("auto", f"{bucket}/cub", st)
    assert cub.attrs["layout"] == "cub200" and len(cub) == 8
    assert all(u.startswith(f"{bucket}/cub/images/") for u in cub["uri"])
    assert st.read_bytes(cub["uri"].iat[0])[:4] == b"\x89PNG"
    dogs = read_dataset("auto", f"{bucket}/dogs", st)
    assert dogs.attrs["layout"] == "stanford_dogs" and len(dogs) == 3


# ------------------------------------------------------------------------------------------ benchmark harness
def test_every_shipped_config_loads(repo_root: Path) -> None:
    from near_ray.config import load_config

    files = sorted((repo_root / "configs").glob("*.yaml"))
    assert {"cub200.yaml", "multidomain.yaml"} <= {f.name for f in files}
    for f in files:
        load_config(f)
    cub = load_config(repo_root / "configs" / "cub200.yaml")
    assert cub.label.backend.type == "vllm" and "Qwen2.5-VL" in cub.label.backend.model_source
    # the -quickgelu twin: the activation OpenAI's weights were trained with
    assert (cub.model.arch, cub.model.pretrained, cub.eval.discovery_per_class) == ("ViT-B-16-quickgelu", "openai", 3)
    multi = load_config(repo_root / "configs" / "multidomain.yaml")
    assert multi.label.backend.type == "openai" and len(multi.data.domains) > 1
    assert all(d.uri.startswith("s3://") and d.meta_class for d in multi.data.domains)


def test_benchmark_job_prepares_discovery_manifest_and_test_truth(tmp_path: Path, repo_root: Path) -> None:
    import json
    import subprocess
    import sys

    tree = Tree(str(tmp_path / "CUB_200_2011"), Storage())
    write_cub(tree)
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(repo_root / "jobs" / "benchmark_fgvr.py"),
        "--dataset",
        "cub200",
        "--root",
        tree.root,
        "--set",
        f"storage.workdir={workdir}",
        "--set",
        "eval.discovery_per_class=2",
        "--prepare-only",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)["benchmark"]
    assert summary | {"manifest": None, "truth": None} == {
        "dataset": "cub200",
        "root": tree.root,
        "domain": "birds",
        "classes": 2,
        "images": 8,
        "discovery_images": 4,
        "discovery_per_class": 2,
        "test_images": 2,
        "manifest": None,
        "truth": None,
    }
    table = read_dataset("cub200", tree.root, tree.st)
    train_uris = set(table.loc[table["split"] == "train", "uri"])
    manifest = tree.st.read_parquet(summary["manifest"]).to_pandas()
    assert list(manifest.columns) == ["uri"]  # no class names reach the labeler
    assert len(manifest) == 4 and set(manifest["uri"]) <= train_uris
    truth = tree.st.read_parquet(summary["truth"]).to_pandas()
    assert set(truth["uri"]) == set(table.loc[table["split"] == "test", "uri"])
    assert (truth["split"] == "test").all() and set(truth["species"]) == {"Black footed Albatross", "Laysan Albatross"}

    bad = subprocess.run(cmd[:3] + ["imagenet"] + cmd[4:], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert bad.returncode == 2 and "near-ray benchmark: error:" in bad.stderr and "unknown dataset layout 'imagenet'" in bad.stderr


def test_benchmark_preparation_on_s3_feeds_the_evaluation(bucket: str, repo_root: Path) -> None:
    from near_ray.config import RunConfig
    from near_ray.data.benchmark import prepare_benchmark
    from near_ray.eval.stage import load_test_sets

    st = Storage()
    write_pets(Tree(f"{bucket}/pets", st))
    cfg = RunConfig()
    cfg.storage.workdir = f"{bucket}/run"
    summary = prepare_benchmark(cfg, "auto", f"{bucket}/pets")
    assert summary["dataset"] == "oxford_pets" and summary["discovery_images"] == 2
    (domain,) = cfg.data.domains
    assert (domain.name, domain.meta_class, domain.manifest) == ("pets", "pet", summary["manifest"])
    test = load_test_sets(cfg, st)
    assert list(test["uri"]) == [f"{bucket}/pets/images/Abyssinian_2.jpg"]
    assert list(test["species"]) == ["Abyssinian"] and list(test["domain"]) == ["pets"]
