"""The train stage: NeaR (or an ablation / the naive baseline) with Ray Train, then the model bundle.

``run_train(cfg)`` trains ``cfg.train.method`` on refine's artifacts, checkpoints every epoch under
``{workdir}/train/{method}`` and writes the bundle to ``{workdir}/bundles/{method}``. Re-running
the same config resumes from the last checkpoint. ``export_zero_shot(cfg)`` writes the untrained
CLIP over the vocabulary as ``bundles/zero_shot``. Pretraining is ``near_ray.train.pretrain``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from near_ray.config import RunConfig
from near_ray.model.clip import encode_texts
from near_ray.ray_session import ensure_ray
from near_ray.storage import Storage, is_s3, storage_for
from near_ray.train.loop import FaultInjection, FineTuneJob
from near_ray.train.methods import get_method
from near_ray.train.runner import TrainError, fit, load_trained_state, ray_run_config, run_name, scaling_config

__all__ = ["TrainError", "export_zero_shot", "run_train"]

log = logging.getLogger(__name__)


def run_train(cfg: RunConfig, fault: FaultInjection | None = None, in_process: bool = False) -> dict[str, Any]:
    """Train ``cfg.train.method`` and export its bundle; returns a summary (epochs, metrics, bundle URI).

    ``in_process`` runs the same loop as one worker in this process, without a Ray Train worker group
    (benchmarks: saves the group's start-up per run). ``fault`` kills a worker once, to exercise recovery.
    """
    import ray

    from near_ray.model.clip import create_clip
    from near_ray.train.data import TrainPixels, image_dataset, load_training_set, neighbour_graph

    st = storage_for(cfg)
    refined = _refine_summary(cfg, st)  # before Ray: refine's outputs must carry the configured edits
    ensure_ray()
    method = cfg.train.method
    if overrides := dict(get_method(method).overrides):  # an ablation: its options, whatever the config says
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=overrides)})
    ts = load_training_set(cfg, method, st)
    clip = create_clip(cfg.model, st)
    names = [v["name"] for v in ts.vocabulary]
    ds = image_dataset(ts.uris, st, clip.pixels, cfg.train.materialize_gib)
    job = FineTuneJob(
        method=method,
        model=cfg.model,
        train=cfg.train,
        storage=st,
        prompts=[cfg.model.prompt_template.format(n) for n in names],
        # through the object store, not the loop config: every worker gets one shared copy
        arrays=ray.put(dataclasses.replace(ts.arrays, neighbours=ts.neighbours[:, : cfg.train.neighbour_k]))
        if cfg.train.neighbour_k else ray.put(ts.arrays),
        pixels=TrainPixels.for_model(clip, cfg.train.augment),
        fault=fault,
    )
    learns = get_method(method)  # what the run learns from its definition, not from the method's name
    definition = [learns.targets, learns.loss, learns.gmm, learns.neighbour_refinement]
    name = run_name(learns.loss, cfg, definition, refined.get("fingerprint"))  # this config's (and refine outputs') run
    t0 = time.monotonic()
    checkpoint = (_fit_in_process if in_process else _fit_ray_train)(cfg, job, ds, st, name)
    elapsed = time.monotonic() - t0
    state, meta = load_trained_state(checkpoint, clip)
    history = meta["history"]
    cand_idx, weights = ts.arrays.cand_idx, state["W"].numpy()
    edits = refined.get("edits")
    vocabulary, pruned = prune_vocabulary(ts.vocabulary, label_support(cand_idx, weights, len(names)),
                                          cfg.train.min_label_support, keep=edited_names(edits))
    kept = [i for i, v in enumerate(ts.vocabulary) if (v.get("domain"), v["name"]) in
            {(k.get("domain"), k["name"]) for k in vocabulary}]
    metrics = {
        "method": method,
        "epochs": history,
        "starts": meta["starts"],
        "train_images": len(ts),
        "dropped": ts.dropped,
        "vocabulary_size": len(names),
        "bundle_vocabulary_size": len(vocabulary),
        "pruned_names": pruned,
        "refine_fingerprint": refined.get("fingerprint"),
        "edits": edits,  # the vocabulary edits refine applied (None: none)
        "workers": 1 if in_process else cfg.train.num_workers,
        "train_time_s": round(elapsed, 2),
        "epoch_time_s_mean": round(float(np.mean([h["epoch_time_s"] for h in history])), 3) if history else None,
    }
    bundle_uri = cfg.paths.bundle(method)
    classes = None
    if cfg.train.prototype_weight > 0:
        text = encode_texts(clip, [v["name"] for v in vocabulary], cfg.model.prompt_template)
        images = training_image_embeddings(cfg, clip, ts, st)
        clusters = None
        if cfg.train.prototype_clusters:  # each image may join the names of its own domain
            clusters = ts.arrays.domain_mask[ts.arrays.domain_of][:, kept]
        votes, voting = weights, "confidence"
        # refine's graph (the one the candidate sets came from) for the methods that use kNN, and those that
        # ask for NeaR's classifier on their own labels (naive_prototypes); naive and no-kNN stay confidence-weighted
        uses_graph = learns.targets == "candidates" or learns.neighbour_refinement or learns.graph_votes
        if cfg.train.prototype_vote == "neighbours" and uses_graph:
            graph = neighbour_graph(cfg, ts.image_ids, st)[:, : cfg.train.neighbour_k or None]
            if graph.shape[1]:
                votes, voting = neighbour_votes(cand_idx, weights, graph), "neighbour"
                # a name its images' neighbourhoods never carry keeps its text vector (rarely nearest, at w = 1)
                metrics["names_without_votes"] = int(((vote_mass(cand_idx, weights, len(names))[kept] > 0)
                                                      & (vote_mass(cand_idx, votes, len(names))[kept] == 0)).sum())
        classes = class_embeddings(text, cand_idx, votes, images, cfg.train.prototype_weight, kept, clusters)
        shape = f"weight {cfg.train.prototype_weight}, {voting} votes"
        shape += ", clustered" if clusters is not None else ""
        metrics["class_embeddings"] = f"text + image prototypes ({shape})"
    export_bundle(cfg, clip, vocabulary, bundle_uri, meta["logit_scale"], metrics, st, classes)
    log.info("train %s: %d epochs in %.1f s, bundle %s", method, len(history), elapsed, bundle_uri)
    return {**metrics, "bundle": bundle_uri, "checkpoint": checkpoint.path}


def _fit_ray_train(cfg: RunConfig, job: FineTuneJob, ds: Any, st: Storage, name: str) -> Any:
    import ray.train.torch

    from near_ray.train.data import train_data_config
    from near_ray.train.loop import train_loop
    from near_ray.train.runner import epoch_feed
    from near_ray.train.tracking import open_tracker

    method = job.method
    job.feed = epoch_feed()
    trainer = ray.train.torch.TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=scaling_config(cfg),
        run_config=ray_run_config(cfg, name, st),
        datasets={"train": ds},
        dataset_config=train_data_config(),
    )
    where = f"train {method} ({cfg.paths.checkpoints(name)})"
    return fit(trainer, where, job.feed, cfg.train.epochs, label=f"train {method}",
               tracker=open_tracker(cfg, method)).checkpoint


def _fit_in_process(cfg: RunConfig, job: FineTuneJob, ds: Any, st: Storage, name: str) -> Any:
    """Checkpoints in ``{workdir}/train/{name}/in_process`` (a local folder; a temporary one for S3)."""
    import tempfile

    import ray.train

    from near_ray.train.loop import train_loop
    from near_ray.train.runner import InProcessSession

    base = cfg.paths.checkpoints(name)
    folder = str(Path(tempfile.mkdtemp(prefix="near_ray_train_")) / "latest") if is_s3(base) else base + "/in_process"
    Path(folder).parent.mkdir(parents=True, exist_ok=True)
    train_loop({"job": job}, InProcessSession(ds, folder))
    return ray.train.Checkpoint.from_directory(folder)


def _refine_summary(cfg: RunConfig, st: Storage) -> dict[str, Any]:
    """Refine's summary ({} before refine ran). With ``refine.edits`` set, refine's outputs must have been
    made with those edits (train reads them, it does not redo them): else one error saying what to run."""
    uri = cfg.paths.refine_summary
    summary = st.read_json(uri) if st.exists(uri) else {}
    if cfg.refine.edits:
        from near_ray.refine.edits import check, read_edits

        edits = read_edits(cfg.refine.edits, st)
        check(edits, [d.name for d in cfg.data.domains])
        if (summary.get("edits") or {}).get("fingerprint") != edits.fingerprint:
            raise TrainError(f"{uri}: refine's outputs were not made with the edits in {cfg.refine.edits}; run "
                             f"`near-ray refine --edits {cfg.refine.edits}` first (no MLLM call: embeddings are reused)")
    return summary


def edited_names(edits: dict[str, Any] | None) -> set[tuple[str, str]]:
    """(domain, name) of the names a person's edits asked for (renamed, merged into, kept apart): never pruned."""
    return {(a.get("domain") or "", a["name"]) for a in (edits or {}).get("applied", [])
            if a["kind"] in ("rename", "merge", "keep_apart") and "name" in a}


def label_support(cand_idx: np.ndarray, confidences: np.ndarray, vocabulary_size: int) -> np.ndarray:
    """Per vocabulary entry: the training images whose final label (their most confident candidate) it is."""
    return np.bincount(final_labels(cand_idx, confidences), minlength=vocabulary_size)


def final_labels(cand_idx: np.ndarray, confidences: np.ndarray) -> np.ndarray:
    """[N] each training image's final label: the vocabulary index of its most confident candidate."""
    return np.take_along_axis(cand_idx, confidences.argmax(axis=1)[:, None], axis=1)[:, 0]


def prune_vocabulary(
    vocabulary: list[dict[str, Any]], support: np.ndarray, min_support: int, keep: set[tuple[str, str]] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundle's vocabulary: names that at least ``min_support`` training images ended up labelled
    with (``train_support`` added to each entry), and the pruned ones. Refinement concentrates an
    image's labels on the names its neighbours share; a name no image kept is a stray answer (a
    synonym, a coarser name, a one-off error) that would only take test images from a real class.
    Each domain keeps at least its best-supported name, and the names in ``keep`` (a person's edits
    asked for them). ``min_support`` 0 keeps every name."""
    best: dict[str, int] = {}
    for i, v in enumerate(vocabulary):
        d = v.get("domain") or ""
        if d not in best or support[i] > support[best[d]]:
            best[d] = i
    kept, pruned = [], []
    for i, v in enumerate(vocabulary):
        if support[i] >= min_support or i in best.values() or (v.get("domain") or "", v["name"]) in (keep or ()):
            kept.append({**v, "train_support": int(support[i])})
        else:
            pruned.append({"name": v["name"], "domain": v.get("domain"), "train_support": int(support[i])})
    return kept, pruned


def neighbour_votes(cand_idx: np.ndarray, confidences: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """[N, S] each training image's vote for each of its candidates (vocabulary indices ``cand_idx``,
    -1 pads) in the image prototypes: its confidence in the name times the share of its neighbours
    ([N, K] sample indices, -1 = none) whose final label (most confident candidate) is that name.

    Why: a prototype is a mean over images whose names are partly wrong. A name that an image's
    neighbourhood shares is the name the kNN premise of the candidate sets supports; a name its
    neighbours do not carry is more likely the MLLM's error on that image, so it counts less in that
    name's prototype. An image without neighbours (or a graph with none) keeps its confidences."""
    if neighbours.shape[1] == 0:
        return confidences
    labels = final_labels(cand_idx, confidences)
    valid = neighbours >= 0
    theirs = np.where(valid, labels[np.clip(neighbours, 0, None)], -1)  # [N, K] the neighbours' labels
    same = ((theirs[:, None, :] == cand_idx[:, :, None]) & (cand_idx >= 0)[:, :, None]).sum(axis=2)
    count = valid.sum(axis=1, keepdims=True)
    share = np.where(count > 0, same / np.maximum(count, 1), 1.0)
    return confidences * share


def vote_mass(cand_idx: np.ndarray, votes: np.ndarray, vocabulary_size: int) -> np.ndarray:
    """Per vocabulary entry: the sum of the training images' votes for it (``votes`` [N, S] at ``cand_idx``)."""
    inside = cand_idx >= 0
    return np.bincount(cand_idx[inside], weights=votes[inside], minlength=vocabulary_size)


def class_embeddings(text: np.ndarray, cand_idx: np.ndarray, confidences: np.ndarray, images: np.ndarray,
                     weight: float, names: list[int], clusters: np.ndarray | None = None) -> np.ndarray:
    """The classifier's class vectors for vocabulary entries ``names`` (``text`` holds theirs): each
    name's text embedding mixed with its image prototype, the confidence-weighted mean of the training
    images' embeddings (FineR and FiNDR classify with such a mix, 0.7 text); confidences [N, S] sit at
    the vocabulary indices ``cand_idx``. ``weight`` is the prototype's share; a name no image supports
    keeps its text. ``clusters`` ([N, len(names)] bool: the names image i may join, its domain's):
    the prototypes are then moved to the clusters of the images they seed (``cluster_prototypes``)."""
    rows, cols = np.nonzero(cand_idx >= 0)
    full = np.zeros((int(cand_idx.max()) + 1 if cand_idx.size else 0, images.shape[1]))
    np.add.at(full, cand_idx[rows, cols], confidences[rows, cols, None].astype(np.float64) * images[rows])
    proto = np.zeros((len(names), images.shape[1]))
    inside = [k for k, v in enumerate(names) if v < len(full)]
    proto[inside] = full[[names[k] for k in inside]]
    norm = np.linalg.norm(proto, axis=1, keepdims=True)
    proto = np.divide(proto, norm, out=np.zeros_like(proto), where=norm > 0)
    if clusters is not None:
        proto = cluster_prototypes(proto, images, clusters & (norm.T > 0))
    mixed = np.where(norm > 0, (1 - weight) * text + weight * proto, text)
    return (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)


def cluster_prototypes(seeds: np.ndarray, images: np.ndarray, allowed: np.ndarray, max_iter: int = 50) -> np.ndarray:
    """Seeded spherical k-means (Basu et al., 2002): the label prototypes ``seeds`` [K, D] (unit rows)
    start it; each image [N, D] joins its most similar prototype among those ``allowed`` [N, K] to it,
    each prototype becomes the normalized mean of its images, until no image changes cluster. A
    prototype keeps its name, so the result is still a named classifier; one that no image joins keeps
    its seed, and so does a row no image may join (a name without support, another domain's).

    Why: the labels' prototypes are means over images whose names are partly wrong, so each carries a
    share of its confusers. Where the image features group by class (the premise of the kNN candidate
    sets), the groups' own centres are the cleaner prototypes, and the labels still decide which group
    carries which name. Deterministic: no random restarts, ties to the lower index.
    """
    x = np.asarray(images, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    proto = np.asarray(seeds, dtype=np.float64).copy()
    members = allowed.any(axis=1)  # an image no name may take joins none
    assign = None
    for _ in range(max_iter):
        sims = np.where(allowed, x @ proto.T, -np.inf)
        new = sims.argmax(axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        sums = np.zeros_like(proto)
        np.add.at(sums, assign[members], x[members])
        norm = np.linalg.norm(sums, axis=1, keepdims=True)
        moved = norm[:, 0] > 0  # a prototype no image joined keeps its place
        proto[moved] = sums[moved] / norm[moved]
    return proto


def training_image_embeddings(cfg: RunConfig, clip: Any, ts: Any, st: Storage) -> np.ndarray:
    """[N, D] eval-transform embeddings of the training images with the trained image tower: refine's,
    when the image tower did not train (``train.train_towers: text``), else computed again here."""
    from near_ray.images import decode_image
    from near_ray.model.clip import encode_images
    from near_ray.refine.embed import read_embeddings

    uri = cfg.paths.embeddings
    if cfg.train.train_towers == "text" and st.exists(uri):
        emb = read_embeddings(uri, st)
        row = {iid: i for i, iid in enumerate(emb.meta["image_id"])}
        if all(i in row for i in ts.image_ids):
            return emb.vectors[[row[i] for i in ts.image_ids]]
    log.info("train: embedding %d training images with the trained image tower for the prototypes", len(ts))
    chunk = 256  # decoded images held at a time (a multiple of encode_images' batch: the same batches)
    parts = [encode_images(clip, [decode_image(st.read_bytes(u), u) for u in ts.uris[i : i + chunk]])
             for i in range(0, len(ts.uris), chunk)]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def export_bundle(
    cfg: RunConfig, clip: Any, vocabulary: list[dict], uri: str, logit_scale: float, metrics: dict, st: Storage,
    classes: np.ndarray | None = None,
) -> str:
    """Bundle = weights + vocabulary + class embeddings: the (fine-tuned) text tower's, or ``classes``."""
    from near_ray.model.bundle import save_bundle

    text = classes if classes is not None else encode_texts(clip, [v["name"] for v in vocabulary],
                                                           cfg.model.prompt_template)
    save_bundle(
        uri,
        clip,
        vocabulary,
        text,
        prompt_template=cfg.model.prompt_template,
        logit_scale=logit_scale,
        abstain_threshold=cfg.serve.abstain_threshold or 0.0,
        metrics=metrics,
        extra_config={"method": metrics.get("method"), "arch": cfg.model.arch, "pretrained": cfg.model.pretrained},
        storage=st,
    )
    return uri


def export_zero_shot(cfg: RunConfig) -> str:
    """The initial CLIP over refine's vocabulary, without fine-tuning, as ``bundles/zero_shot``."""
    from near_ray.model.clip import create_clip
    from near_ray.train.data import TrainDataError

    st = storage_for(cfg)
    vocab_uri = cfg.paths.vocabulary
    if not st.exists(vocab_uri):
        raise TrainDataError(f"{vocab_uri}: missing; run `near-ray refine` first")
    clip = create_clip(cfg.model, st)
    scale = float(min(100.0, clip.model.logit_scale.exp().item()))
    uri = cfg.paths.bundle("zero_shot")
    return export_bundle(cfg, clip, st.read_json(vocab_uri), uri, scale, {"method": "zero_shot", "epochs": []}, st)
