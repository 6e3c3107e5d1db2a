"""Fine-grained benchmarks in their native layouts, read through ``Storage`` (local folders or s3://).

Every reader returns ``Sample(uri, class_name, split, domain)`` rows; ``read_dataset`` turns them
into a pandas table with those columns. Layouts:

  cub200         CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/
  stanford_cars  devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat,
                 cars_train/, cars_test/
  stanford_dogs  Images/<wnid-name>/, train_list.mat + test_list.mat (or file_list.mat: no split)
  flowers102     jpg/, imagelabels.mat, setid.mat (class names shipped with near_ray: the dataset has none)
  oxford_pets    images/, annotations/trainval.txt, annotations/test.txt
  folder         root/<class>/<img> or root/<split>/<class>/<img>
  unlabeled      any images below root (class_name None)
  auto           the first of the above whose marker files exist

``split`` is "train", "test", "val" or "" when the layout has no split. .mat files are read with
``scipy.io.loadmat``: plain data, no code runs.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from near_ray.errors import NearRayError
from near_ray.storage import Storage, join, relative

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "val": "val",
    "valid": "val",
    "validation": "val",
}
COLUMNS = ["uri", "class_name", "split", "domain"]


class DatasetError(NearRayError):
    """A dataset root that cannot be read in the requested layout; names the root and the expected files."""


@dataclass(frozen=True)
class Sample:
    uri: str
    class_name: str | None
    split: str
    domain: str


@dataclass(frozen=True)
class Layout:
    """One dataset layout, whole: what the field calls it, how near_ray lists and names its images, and the
    marker files that identify it (``auto``). Adding a layout is one record in ``LAYOUTS``."""

    name: str
    read: Callable[..., list[Sample]]  # (root, storage, domain) -> samples
    domain: str | None  # default domain name of its rows (None: the root folder's name)
    meta_class: str | None  # named in the MLLM prompt
    aliases: tuple[str, ...] = ()
    markers: tuple[tuple[str, ...], ...] = ()  # any one group of files, all present, identifies it
    labelled: bool = True  # its images come with class names (a truth table)


# ------------------------------------------------------------------------------ index and .mat files
def _text(storage: Storage, root: str, name: str, layout: str) -> str:
    uri = join(root, name)
    try:
        return storage.read_text(uri)
    except NearRayError as e:
        raise DatasetError(f"{root}: not a {layout} dataset: cannot read {name} ({e})") from e


def _mat(storage: Storage, root: str, names: list[str], layout: str) -> dict[str, Any]:
    """The first of ``names`` (paths below root) that exists, loaded with scipy.io.loadmat."""
    from scipy.io import loadmat

    for name in names:
        uri = join(root, name)
        if storage.exists(uri):
            try:
                return loadmat(io.BytesIO(storage.read_bytes(uri)), squeeze_me=True)
            except NearRayError:
                raise
            except Exception as e:
                raise DatasetError(f"{uri}: not a readable .mat file ({type(e).__name__}: {e})") from e
    raise DatasetError(f"{root}: not a {layout} dataset: missing {' or '.join(names)}")


def _field(mat: dict[str, Any], key: str, where: str) -> np.ndarray:
    if key not in mat:
        raise DatasetError(f"{where}: no '{key}' variable (found {sorted(k for k in mat if not k.startswith('__'))})")
    return np.atleast_1d(mat[key])  # squeeze_me turns one-element arrays into scalars


def _id_lines(text: str) -> dict[str, list[str]]:
    """``<id> <value...>`` lines (CUB's index files) -> {id: [values]}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[1:]
    return out


def clean_class_name(folder: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'; 'n02085782-Japanese_spaniel' -> 'Japanese spaniel'."""
    name = re.sub(r"^\d+\.", "", folder)
    name = re.sub(r"^n\d{8}-", "", name)
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip()


def pets_class_name(stem: str) -> str:
    """'american_bulldog_12' -> 'American Bulldog'; 'Abyssinian_100' -> 'Abyssinian'."""
    breed = re.sub(r"_\d+$", "", stem)
    return " ".join(w[:1].upper() + w[1:] for w in breed.split("_") if w)


def flowers102_names() -> list[str]:
    return json.loads(resources.files("near_ray.data").joinpath("flowers102_classes.json").read_text())


# ------------------------------------------------------------------------------------------ readers
def _cub_root(root: str, storage: Storage) -> str:
    # The tarball unpacks to CUB_200_2011/: accept either the folder or its parent.
    nested = join(root, "CUB_200_2011")
    return (
        nested if not storage.exists(join(root, "images.txt")) and storage.exists(join(nested, "images.txt")) else root
    )


def read_cub200(root: str, storage: Storage, domain: str = "birds") -> list[Sample]:
    root = _cub_root(root, storage)
    layout = "cub200 (CUB-200-2011)"
    images = _id_lines(_text(storage, root, "images.txt", layout))
    labels = _id_lines(_text(storage, root, "image_class_labels.txt", layout))
    splits = _id_lines(_text(storage, root, "train_test_split.txt", layout))
    classes = _id_lines(_text(storage, root, "classes.txt", layout))
    out = []
    for image_id, (path, *_) in images.items():
        try:
            class_folder = classes[labels[image_id][0]][0]
            split = "train" if splits[image_id][0] == "1" else "test"
        except KeyError as e:
            raise DatasetError(f"{root}: image {image_id} ({path}) has no class or split entry ({e})") from None
        out.append(Sample(join(root, "images", path), clean_class_name(class_folder), split, domain))
    return out


def _cars_annotations(storage: Storage, root: str, names: list[str], layout: str) -> list[tuple[str, int]]:
    mat = _mat(storage, root, names, layout)
    annos = _field(mat, "annotations", f"{root}/{names[0]}")
    if "class" not in (annos.dtype.names or ()):
        raise DatasetError(f"{root}/{names[0]}: annotations have no 'class' field (the test file must be *_withlabels)")
    return [(str(a["fname"]), int(a["class"])) for a in annos]


def read_stanford_cars(root: str, storage: Storage, domain: str = "cars") -> list[Sample]:
    layout = "stanford_cars (devkit layout)"
    names = [
        str(n)
        for n in _field(
            _mat(storage, root, ["devkit/cars_meta.mat", "cars_meta.mat"], layout),
            "class_names",
            f"{root}/devkit/cars_meta.mat",
        )
    ]
    train = _cars_annotations(storage, root, ["devkit/cars_train_annos.mat", "cars_train_annos.mat"], layout)
    test = _cars_annotations(
        storage, root, ["cars_test_annos_withlabels.mat", "devkit/cars_test_annos_withlabels.mat"], layout
    )
    out = []
    for split, folder, annos in (("train", "cars_train", train), ("test", "cars_test", test)):
        for fname, label in annos:
            if not 1 <= label <= len(names):
                raise DatasetError(f"{root}: {folder}/{fname} has class {label}, outside 1..{len(names)}")
            out.append(Sample(join(root, folder, fname), names[label - 1], split, domain))
    return out


def read_stanford_dogs(root: str, storage: Storage, domain: str = "dogs") -> list[Sample]:
    layout = "stanford_dogs"
    lists = [("train", "train_list.mat"), ("test", "test_list.mat")]
    if not all(storage.exists(join(root, n)) or storage.exists(join(root, "lists", n)) for _, n in lists):
        lists = [("", "file_list.mat")]  # the full list has no split
    out = []
    for split, name in lists:
        files = _field(_mat(storage, root, [name, f"lists/{name}"], layout), "file_list", f"{root}/{name}")
        for rel in files:
            rel = str(rel)
            out.append(Sample(join(root, "Images", rel), clean_class_name(rel.split("/")[0]), split, domain))
    return out


def read_flowers102(root: str, storage: Storage, domain: str = "flowers") -> list[Sample]:
    layout = "flowers102 (Oxford 102 Flowers)"
    labels = _field(_mat(storage, root, ["imagelabels.mat"], layout), "labels", f"{root}/imagelabels.mat")
    setid = _mat(storage, root, ["setid.mat"], layout)
    names = flowers102_names()
    split_of = {}
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for i in _field(setid, key, f"{root}/setid.mat"):
            split_of[int(i)] = split
    out = []
    for i, label in enumerate(labels, start=1):
        if not 1 <= int(label) <= len(names):
            raise DatasetError(f"{root}/imagelabels.mat: image {i} has label {label}, outside 1..{len(names)}")
        out.append(Sample(join(root, "jpg", f"image_{i:05d}.jpg"), names[int(label) - 1], split_of.get(i, ""), domain))
    return out


def read_oxford_pets(root: str, storage: Storage, domain: str = "pets") -> list[Sample]:
    layout = "oxford_pets (Oxford-IIIT Pet)"
    out = []
    for split, name in (("train", "annotations/trainval.txt"), ("test", "annotations/test.txt")):
        for line in _text(storage, root, name, layout).splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            stem = line.split()[0]
            out.append(Sample(join(root, "images", f"{stem}.jpg"), pets_class_name(stem), split, domain))
    return out


def _list_images(root: str, storage: Storage, layout: str) -> list[tuple[str, list[str]]]:
    """(uri, path parts below root) of every image below root."""
    try:
        found = [(o.uri, relative(o.uri, root).split("/")) for o in storage.list(root, suffixes=IMAGE_EXTENSIONS)]
    except NearRayError as e:
        raise DatasetError(f"{root}: cannot list the {layout} dataset ({e})") from e
    if not found:
        raise DatasetError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found for layout {layout}")
    return found


def read_folder(root: str, storage: Storage, domain: str | None = None) -> list[Sample]:
    """root/<class>/<img> or root/<split>/<class>/<img>; the class is the folder holding the image."""
    domain = domain or _basename(root)
    out = []
    for uri, parts in _list_images(root, storage, "folder (root/<class>/<image>)"):
        if len(parts) < 2:
            raise DatasetError(f"{uri}: an image directly under {root}; the folder layout wants root/<class>/<image>")
        split = SPLIT_NAMES.get(parts[0].lower(), "") if len(parts) >= 3 else ""
        out.append(Sample(uri, clean_class_name(parts[-2]), split, domain))
    return out


def read_unlabeled(root: str, storage: Storage, domain: str | None = None) -> list[Sample]:
    domain = domain or _basename(root)
    return [Sample(uri, None, "", domain) for uri, _ in _list_images(root, storage, "unlabeled")]


def _basename(root: str) -> str:
    return root.rstrip("/").rsplit("/", 1)[-1] or "images"


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("cub200", read_cub200, "birds", "bird", ("cub", "cub_200_2011"),
               (("images.txt", "classes.txt"), ("CUB_200_2011/images.txt", "CUB_200_2011/classes.txt"))),
        Layout("stanford_cars", read_stanford_cars, "cars", "car", ("cars", "cars196"),
               (("devkit/cars_meta.mat",), ("cars_meta.mat", "cars_train_annos.mat"))),
        Layout("stanford_dogs", read_stanford_dogs, "dogs", "dog", ("dogs", "dogs120"),
               (("train_list.mat",), ("file_list.mat",), ("lists/train_list.mat",))),
        Layout("flowers102", read_flowers102, "flowers", "flower", ("flowers",), (("imagelabels.mat", "setid.mat"),)),
        Layout("oxford_pets", read_oxford_pets, "pets", "pet", ("pets", "pets37"), (("annotations/trainval.txt",),)),
        Layout("folder", read_folder, None, None, ("imagefolder",)),  # detected when every image is in a subfolder
        Layout("unlabeled", read_unlabeled, None, None, labelled=False),
    )
}
ALIASES = {alias: lay.name for lay in LAYOUTS.values() for alias in lay.aliases}


# ------------------------------------------------------------------------------------------ front door
def canonical_layout(layout: str) -> str:
    key = layout.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key != "auto" and key not in LAYOUTS:
        raise DatasetError(f"unknown dataset layout '{layout}': use one of auto, {', '.join(LAYOUTS)}")
    return key


def detect_layout(root: str, storage: Storage) -> str:
    """The layout whose marker files exist under root; else folder (images in subfolders) or unlabeled."""
    for lay in LAYOUTS.values():
        if any(all(storage.exists(join(root, m)) for m in group) for group in lay.markers):
            return lay.name
    found = _list_images(root, storage, "auto")
    return "folder" if all(len(parts) >= 2 for _, parts in found) else "unlabeled"


def read_dataset(layout: str, root: str, storage: Storage | None = None, domain: str | None = None) -> pd.DataFrame:
    """A table (uri, class_name, split, domain) of every image of the dataset at ``root``."""
    st = storage or Storage()
    key = canonical_layout(layout)
    if key == "auto":
        key = detect_layout(root, st)
    lay = LAYOUTS[key]
    samples = lay.read(root, st, domain or lay.domain)
    if not samples:
        raise DatasetError(f"{root}: the {key} layout lists no images")
    table = pd.DataFrame([asdict(s) for s in samples], columns=COLUMNS)
    table.attrs["layout"] = key
    return table


def discovery_set(table: pd.DataFrame, per_class: int = 3, seed: int = 0, split: str = "train") -> pd.DataFrame:
    """FineR's discovery set: ``per_class`` images of each class from ``split``, seeded and deterministic.

    When the table has no split information at all, every image is eligible. Classes with fewer
    images contribute all of theirs.
    """
    if per_class < 1:
        raise DatasetError(f"discovery_set: per_class must be >= 1, got {per_class}")
    pool = table if (table["split"] == "").all() else table[table["split"] == split]
    pool = pool[pool["class_name"].notna()]
    if pool.empty:
        raise DatasetError(
            f"discovery_set: no labeled images in split '{split}' (splits present: {sorted(set(table['split']))})"
        )
    rng = random.Random(seed)
    picked = []
    for class_name in sorted(pool["class_name"].unique()):
        uris = sorted(pool.loc[pool["class_name"] == class_name, "uri"])
        picked.extend(rng.sample(uris, min(per_class, len(uris))))
    return table[table["uri"].isin(set(picked))].sort_values(["class_name", "uri"]).reset_index(drop=True)
