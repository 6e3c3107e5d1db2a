"""Training helpers shared by the train tests, the backbone test, the tracking test and the fault suite:
refine's artifacts written per the data contract over tiny coloured squares (no label or refine stage),
a run config, predictions from a checkpoint, and the scalars of a TensorBoard event file."""

from __future__ import annotations

import io
import struct

import numpy as np
import pyarrow as pa
from PIL import Image

from near_ray.config import RunConfig
from near_ray.storage import Storage, join

CLASSES = {"birds": ["red tit", "green tit", "blue tit"], "flowers": ["gold rose", "pale rose"]}
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 200, 30), (200, 200, 220)]


def _image(colour: tuple[int, int, int], rng: np.random.Generator) -> bytes:
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_refine_artifacts(workdir: str, per_class: int = 6, seed: int = 0, stray: str | None = None) -> list[dict]:
    """Images + refine outputs; every third image of a class has a wrong majority label but the true
    label among its candidates (from its neighbours). ``stray``: a birds name one MLLM answer gave
    once, in the vocabulary but nobody's label. Returns the rows (with their true class)."""
    st, rng = Storage(), np.random.default_rng(seed)
    rows, colour = [], 0
    for domain, names in CLASSES.items():
        for c, name in enumerate(names):
            for j in range(per_class):
                uri = join(workdir, "images", domain, f"{c}_{j}.png")
                st.write_bytes(uri, _image(COLOURS[colour], rng))
                wrong = names[(c + 1) % len(names)]
                noisy = j % 3 == 2
                own = [wrong, wrong, name] if noisy else [name, name, wrong if j % 3 == 1 else name]
                cands = sorted({name, wrong})
                conf = [0.6 if n == (wrong if noisy else name) else 0.4 for n in cands]
                rows.append(dict(image_id=f"{domain}-{c}-{j}", uri=uri, domain=domain, own_labels=own,
                                 majority_label=None if j == 0 else own[0], candidates=cands,
                                 confidences=conf, truth=name))
            colour += 1
    vocab = [{"name": n, "domain": d, "synonyms": [n], "support": per_class} for d, ns in CLASSES.items() for n in ns]
    if stray:
        rows[1]["own_labels"] = [rows[1]["own_labels"][0], rows[1]["own_labels"][1], stray]
        vocab.append({"name": stray, "domain": "birds", "synonyms": [stray], "support": 1})
    st.write_json(join(workdir, "refine", "vocabulary.json"), vocab)
    cols = ["image_id", "uri", "domain", "own_labels", "majority_label", "candidates", "confidences"]
    table = pa.table({k: [r[k] for r in rows] for k in cols}).cast(
        pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("domain", pa.string()),
                   ("own_labels", pa.list_(pa.string())), ("majority_label", pa.string()),
                   ("candidates", pa.list_(pa.string())), ("confidences", pa.list_(pa.float32()))]))
    st.write_parquet(join(workdir, "refine", "candidates.parquet"), table)
    nbrs = [[o["image_id"] for o in rows if o["truth"] == r["truth"] and o is not r][:4] for r in rows]
    st.write_parquet(join(workdir, "refine", "neighbors.parquet"), pa.table({
        "image_id": [r["image_id"] for r in rows], "domain": [r["domain"] for r in rows],
        "neighbors": nbrs, "similarities": [[0.9] * len(n) for n in nbrs]}))
    return rows


def train_config(workdir: str, **train) -> RunConfig:
    """NeaR's training (its phases, clean split, refreshed graph) unless a test names another method."""
    base = dict(method="near", num_workers=1, cpus_per_worker=0.5, epochs=3, warmup_epochs=1, batch_size=16,
                lr=1e-3, augment=False, seed=0)
    return RunConfig.model_validate({"storage": {"workdir": workdir}, "model": {"arch": "near-tiny", "pretrained": "random"},
                                     "train": {**base, **train}})


# ------------------------------------------------------------------------------------ Ray Train
def predict_from_checkpoint(cfg: RunConfig, checkpoint, rows: list[dict], domain: str) -> np.ndarray:
    """What the trained model predicts, computed from the checkpoint independently of the bundle."""
    from near_ray.images import decode_image
    from near_ray.model.clip import create_clip, encode_images, encode_texts
    from near_ray.train.runner import load_trained

    st = Storage()
    clip = create_clip(cfg.model, st)
    meta = load_trained(checkpoint, clip)
    vocab = st.read_json(cfg.artifact("refine/vocabulary.json"))
    idx = [i for i, v in enumerate(vocab) if v["domain"] == domain]
    text = encode_texts(clip, [vocab[i]["name"] for i in idx], cfg.model.prompt_template)
    images = [decode_image(st.read_bytes(r["uri"])) for r in rows if r["domain"] == domain]
    logits = meta["logit_scale"] * encode_images(clip, images) @ text.T
    return np.array(idx)[logits.argmax(1)]


def scalars(data: bytes) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    out, pos = [], 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        record = data[pos + 12:pos + 12 + length]
        pos += 12 + length + 4
        event = event_pb2.Event.FromString(record)
        for v in event.summary.value:
            out.append((v.tag, int(event.step), float(v.simple_value)))
    return out
