"""What the trainer learns from: refine's artifacts as per-sample arrays, and the image stream.

``load_training_set`` turns ``refine/vocabulary.json``, ``refine/candidates.parquet`` and
``refine/neighbors.parquet`` into arrays indexed by sample (0..N-1), holding each sample's candidate
set as vocabulary indices (0..V-1), shaped for one method (NeaR, an ablation or the naive baseline). ``image_dataset`` is the Ray Data
stream the workers iterate: decoded once into the model's input pixels (``near_ray.model.preprocess``,
the geometry every stage uses), materialized; the loops reshuffle it every epoch with a
seeded local shuffle buffer (``train.shuffle_buffer``, ``near_ray.train.loop.shuffle_kwargs``) and
augment each sample with crops seeded by (seed, epoch, sample), so a run is reproducible.

Memory grows with N·|S| (candidate-set sizes are ~3-10), not N·V: 100k images in a 10k-name
vocabulary are a few megabytes, not 4 GB per matrix.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from near_ray.errors import NearRayError
from near_ray.model.preprocess import PixelSpec, normalize, preprocessor, unit_pixels
from near_ray.storage import Storage
from near_ray.train.methods import METHODS, Method

if TYPE_CHECKING:
    import ray.data

    from near_ray.config import RunConfig

log = logging.getLogger(__name__)

class TrainDataError(NearRayError):
    """Refine's artifacts are missing or do not fit together; the message names the file and field."""


@dataclass
class CandidateArrays:
    """The per-sample training state's inputs, sized by what they hold (N·|S|, not N·V).

    Row i is sample i. Candidate sets are padded rows of vocabulary indices, ascending (-1 pads), with
    the initial confidence of each; a sample's domain picks its vocabulary (``domain_mask``).
    """

    cand_idx: np.ndarray  # [N, S] int64 vocabulary indices of S_i, ascending, -1 = padding
    cand_w0: np.ndarray  # [N, S] float32 initial confidences W0 (rows sum to 1, 0 at padding)
    domain_of: np.ndarray  # [N] int64: the sample's domain (row of domain_mask)
    domain_mask: np.ndarray  # [D, V] bool: the vocabulary entries of each domain
    neighbours: np.ndarray  # [N, K] int64 sample indices, -1 = none

    @property
    def vocabulary_size(self) -> int:
        return int(self.domain_mask.shape[1])


@dataclass
class TrainingSet:
    """Per-sample arrays for one method; row i of every array is sample i."""

    image_ids: list[str]
    uris: list[str]
    domains: list[str]
    vocabulary: list[dict[str, Any]]
    arrays: CandidateArrays
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def neighbours(self) -> np.ndarray:
        return self.arrays.neighbours

    # Dense [N, V] views, for inspection and small sets only: training never builds them.
    @property
    def candidates(self) -> np.ndarray:
        return densify(self.arrays.cand_idx, self.arrays.cand_idx >= 0, self.arrays.vocabulary_size).astype(bool)

    @property
    def confidences(self) -> np.ndarray:
        return densify(self.arrays.cand_idx, self.arrays.cand_w0, self.arrays.vocabulary_size)

    @property
    def allowed(self) -> np.ndarray:
        return self.arrays.domain_mask[self.arrays.domain_of]


def densify(cand_idx: np.ndarray, values: np.ndarray, vocabulary_size: int) -> np.ndarray:
    """[N, S] values at [N, S] vocabulary indices (-1 = none) -> [N, V]."""
    out = np.zeros((len(cand_idx), vocabulary_size), dtype=np.asarray(values).dtype)
    rows, cols = np.nonzero(cand_idx >= 0)
    out[rows, cand_idx[rows, cols]] = np.asarray(values)[rows, cols]
    return out


def vocabulary_index(vocabulary: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    return {(v.get("domain") or "", v["name"]): i for i, v in enumerate(vocabulary)}


def _read_refine(cfg: RunConfig, storage: Storage) -> tuple[list[dict], list[dict], list[dict]]:
    vocab_uri = cfg.paths.vocabulary
    cand_uri = cfg.paths.candidates
    for uri in (vocab_uri, cand_uri):
        if not storage.exists(uri):
            raise TrainDataError(f"{uri}: missing; run `near-ray refine` first")
    vocabulary = storage.read_json(vocab_uri)
    if not isinstance(vocabulary, list) or not vocabulary or not all("name" in v for v in vocabulary):
        raise TrainDataError(f"{vocab_uri}: expected a non-empty list of {{'name', 'domain', ...}} entries")
    table = storage.read_parquet(cand_uri)
    need = {"image_id", "uri", "domain", "own_labels", "majority_label", "candidates", "confidences"}
    if missing := sorted(need - set(table.column_names)):
        raise TrainDataError(f"{cand_uri}: missing columns {missing}")
    return vocabulary, table.select(sorted(need)).to_pylist(), _read_neighbours(cfg, storage)


def _read_neighbours(cfg: RunConfig, storage: Storage) -> list[dict]:
    """Refine's kNN graph as rows of {image_id, neighbors}; none when refine wrote no graph."""
    nb_uri = cfg.paths.neighbors
    return storage.read_parquet(nb_uri).select(["image_id", "neighbors"]).to_pylist() if storage.exists(nb_uri) else []


# ------------------------------------------------------------------------------------------ target rules
TargetRule = Callable[[dict[str, Any], str, dict[tuple[str, str], int]], dict[int, float]]


def _majority(row: dict[str, Any], domain: str, index: dict[tuple[str, str], int]) -> dict[int, float]:
    """The MLLM's majority answer alone."""
    v = index.get((domain, row["majority_label"])) if row["majority_label"] else None
    return {} if v is None else {v: 1.0}


def _own_labels(row: dict[str, Any], domain: str, index: dict[tuple[str, str], int]) -> dict[int, float]:
    """The MLLM's own answers, weighted by how often each was given."""
    counts = Counter(index[(domain, n)] for n in (row["own_labels"] or []) if (domain, n) in index)
    return {v: float(c) for v, c in counts.items()}


def _candidates(row: dict[str, Any], domain: str, index: dict[tuple[str, str], int]) -> dict[int, float]:
    """Refine's candidate set (own answers and the neighbours' votes) with its confidences."""
    out: dict[int, float] = {}
    for name, conf in zip(row["candidates"] or [], row["confidences"] or [], strict=False):
        if (domain, name) in index:
            out[index[(domain, name)]] = out.get(index[(domain, name)], 0.0) + max(float(conf), 1e-6)
    return out


# Where a training image starts, by ``Method.targets`` (every value but "none", which trains nothing): its
# initial weights {vocabulary index: weight} from its candidates.parquet row; empty = it is not trainable.
TARGET_RULES: dict[str, TargetRule] = {"majority": _majority, "own_labels": _own_labels, "candidates": _candidates}
_DROPPED_AS = {"majority": "no_majority_label"}  # why an image without weights is left out (else no_candidates)


def _initial_confidences(row: dict, method: Method, index: dict[tuple[str, str], int]) -> dict[int, float]:
    """{vocabulary index: weight} for one image under ``method``; empty = the image is not trainable."""
    return TARGET_RULES[method.targets](row, row["domain"] or "", index)


def load_training_set(cfg: RunConfig, name: str, storage: Storage) -> TrainingSet:
    """Per-sample arrays for method ``name`` from refine's artifacts under ``cfg.storage.workdir``."""
    method = METHODS.get(name)
    if method is None or not method.trained:
        raise TrainDataError(f"train.method: '{name}' is not a trained method")
    vocabulary, cands, nb_table = _read_refine(cfg, storage)
    index = vocabulary_index(vocabulary)
    rows, weights = [], []
    dropped: Counter[str] = Counter()
    for row in cands:
        w = _initial_confidences(row, method, index)
        if not w:
            dropped[_DROPPED_AS.get(method.targets, "no_candidates")] += 1
            continue
        rows.append(row)
        weights.append(w)
    if not rows:
        raise TrainDataError(f"{cfg.paths.candidates}: no trainable image for method '{name}'")
    n, width = len(rows), max(len(w) for w in weights)
    cand_idx = np.full((n, width), -1, dtype=np.int64)
    cand_w0 = np.zeros((n, width), dtype=np.float32)
    for i, w in enumerate(weights):
        order = sorted(w)  # ascending vocabulary index: ties of argmax go to the lower index, as dense would
        cand_idx[i, : len(order)] = order
        cand_w0[i, : len(order)] = [w[k] for k in order]
    cand_w0 /= cand_w0.sum(axis=1, keepdims=True)
    domains = [r["domain"] or "" for r in rows]
    names = sorted(set(domains) | {x.get("domain") or "" for x in vocabulary})
    vocab_domains = np.array([x.get("domain") or "" for x in vocabulary])
    domain_mask = np.array([vocab_domains == d for d in names], dtype=bool).reshape(len(names), len(vocabulary))
    domain_of = np.array([names.index(d) for d in domains], dtype=np.int64)
    image_ids = [r["image_id"] for r in rows]
    neighbours = _neighbour_matrix(image_ids, nb_table) if method.neighbour_refinement else np.full((n, 0), -1)
    if dropped:
        log.info("train %s: dropped %s", name, dict(dropped))
    arrays = CandidateArrays(cand_idx, cand_w0, domain_of, domain_mask, neighbours)
    return TrainingSet(image_ids, [r["uri"] for r in rows], domains, vocabulary, arrays, dict(dropped))


def neighbour_graph(cfg: RunConfig, image_ids: list[str], storage: Storage) -> np.ndarray:
    """[N, K] refine's kNN graph over these training samples, for any method (sample indices, -1 pads;
    K = 0 when refine wrote none)."""
    return _neighbour_matrix(image_ids, _read_neighbours(cfg, storage))


def _neighbour_matrix(image_ids: list[str], table: list[dict]) -> np.ndarray:
    """[N, K] sample indices of each sample's neighbours that are themselves trainable; -1 pads."""
    pos = {iid: i for i, iid in enumerate(image_ids)}
    lists: list[list[int]] = [[] for _ in image_ids]
    for row in table:
        i = pos.get(row["image_id"])
        if i is not None:
            lists[i] = [pos[n] for n in (row["neighbors"] or []) if n in pos and pos[n] != i]
    k = max((len(x) for x in lists), default=0)
    out = np.full((len(image_ids), k), -1, dtype=np.int64)
    for i, x in enumerate(lists):
        out[i, : len(x)] = x
    return out


# ------------------------------------------------------------------------------------------ images
def _decode_batch(batch: dict[str, np.ndarray], storage: Storage, spec: PixelSpec) -> dict[str, np.ndarray]:
    """Read and decode each image and make the model's input pixels with its preprocessor (uint8 HWC):
    the same geometry as refine, classify, serving and evaluation (short side resized, centre crop)."""
    from near_ray.images import decode_image

    prep = preprocessor(spec)
    images = [prep.pixels(decode_image(storage.read_bytes(str(uri)), what=str(uri))) for uri in batch["uri"]]
    return {"idx": batch["idx"], "image": np.stack(images)}


@dataclass(frozen=True)
class TrainPixels:
    """How the training loops turn the model's input pixels into a training batch: the model's pixel
    spec, with open_clip's train augmentation on top (a random resized crop of those pixels, ``scale``
    of the area, ``ratio`` aspect, bicubic) or none (the pixels every other stage sees)."""

    spec: PixelSpec
    augment: bool = True
    scale: tuple[float, float] = (0.9, 1.0)  # open_clip's AugmentationCfg default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @classmethod
    def for_model(cls, clip: Any, augment: bool) -> TrainPixels:
        """The pixel spec of ``clip`` (a ``near_ray.model.Clip``)."""
        return cls(clip.pixels, augment)


def crop_boxes(idx: np.ndarray, height: int, width: int, spec: TrainPixels, seed: int, epoch: int) -> np.ndarray:
    """[B, 4] (top, left, h, w) random resized crops, one per sample.

    Each sample's crop comes from its own generator seeded by (seed, epoch, sample index): the same
    run draws the same crops however samples are batched, ordered or spread over workers, and every
    epoch draws new ones. The sampling follows torchvision's ``RandomResizedCrop.get_params``.
    """
    out = np.empty((len(idx), 4), dtype=np.int64)
    area, lo, hi = height * width, np.log(spec.ratio[0]), np.log(spec.ratio[1])
    for j, i in enumerate(np.asarray(idx).tolist()):
        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch, int(i)])
        for _ in range(10):
            target = area * rng.uniform(*spec.scale)
            aspect = np.exp(rng.uniform(lo, hi))
            w, h = round(float(np.sqrt(target * aspect))), round(float(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                out[j] = (rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w)
                break
        else:  # torchvision's fallback: the whole image
            out[j] = (0, 0, height, width)
    return out


def to_pixels(images: Any, idx: Any, pixels: TrainPixels, seed: int, epoch: int) -> Any:
    """uint8 [B, size, size, 3] input pixels (on any device) -> normalized float [B, 3, size, size] model
    input, augmented when ``pixels.augment``; without augmentation exactly what inference feeds the model."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    size = pixels.spec.size
    if tuple(images.shape[1:3]) != (size, size):  # the dataset holds preprocessed pixels, nothing else
        raise TrainDataError(f"training images are {tuple(images.shape[1:3])}, not the model's {size}x{size}")
    x = unit_pixels(images, images.device)
    if pixels.augment:
        boxes = crop_boxes(idx.cpu().numpy(), size, size, pixels, seed, epoch)
        x = torch.stack([
            TF.resized_crop(x[j], int(top), int(left), int(h), int(w), [size, size],
                            InterpolationMode.BICUBIC, antialias=True)
            for j, (top, left, h, w) in enumerate(boxes)
        ]).clamp_(0, 1)
    return normalize(x, pixels.spec)


def decoded_bytes(images: int, spec: PixelSpec) -> int:
    """What the decoded training set takes in the object store: uint8 [size, size, 3] per image."""
    return images * spec.size * spec.size * 3


def image_dataset(uris: list[str], storage: Storage, spec: PixelSpec, materialize_gib: float = 4.0) -> ray.data.Dataset:
    """Rows {idx, image uint8 [size, size, 3]}: the model's input pixels. Decoded once and materialized
    when they take at most ``materialize_gib`` GiB (``train.materialize_gib``); above that, every epoch
    decodes them again as it streams, and the object store never holds the whole set (at 224 px a
    decoded image is 150 KB: 1 M images would be 150 GB, spilled to disk).

    The loops augment in the worker (``to_pixels``), with crops seeded per sample and epoch, so a
    run is reproducible; the shard's order is preserved (``train_data_config``) for the same reason,
    streamed or not.
    """
    import ray.data

    items = [{"idx": i, "uri": u} for i, u in enumerate(uris)]
    blocks = max(1, min(16, len(items) // 32))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        _decode_batch, fn_kwargs={"storage": storage, "spec": spec}, batch_size=32, num_cpus=0.25)
    # The materialized blocks keep the items' order, not the order their decode tasks finished in:
    # the split across workers (and so each batch) would otherwise change from run to run.
    ds.context.execution_options.preserve_order = True
    if decoded_bytes(len(uris), spec) > materialize_gib * 2**30:
        log.info("train: %d images decode to %.1f GiB (> train.materialize_gib %.1f): streamed, decoded every epoch",
                 len(uris), decoded_bytes(len(uris), spec) / 2**30, materialize_gib)
        return ds
    return ds.materialize()


def train_data_config() -> Any:
    """Ray Train's ``DataConfig`` with order preserved: the same blocks reach the same worker in the same
    order on every run, so the seeded shuffle buffer gives the same batches."""
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=current.resource_limits, verbose_progress=current.verbose_progress,
                               preserve_order=True)
    return ray.train.DataConfig(execution_options=options)
