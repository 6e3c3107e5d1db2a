"""Preflight: what a command needs, checked before Ray starts or money is spent.

Every command of ``near-ray`` (and so every ``jobs/*.py``) runs the checks its work depends on, in an
order from cheap to paid: the S3 endpoint answers; the domains exist and hold images; the workdir
takes a write (a probe object written and deleted); the label backend imports; the artifacts of
earlier stages (labels, refine's outputs, bundles) are on storage; the starting CLIP's weights are
named and where they come from is said; the MLLM answers one real, authenticated request (one
image, one output token: its tokens and price are counted). A failed check is one line naming the
field, domain or file; ``near-ray validate`` runs them all and prints each.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from near_ray.config import RANDOM_INIT, RunConfig
from near_ray.errors import NearRayError
from near_ray.storage import Storage, StorageError, is_s3, join, split_s3, storage_for

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 3.0


class PreflightError(NearRayError):
    """A check before the work failed; the message names the field, domain or file."""


class Failed(Exception):
    """Raised by a check: its one-line reason."""


@dataclass
class Check:
    """One check's result: ``ok``, what was found (or why it failed), its wall time and any counts."""

    name: str
    ok: bool
    detail: str
    seconds: float
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    cfg: RunConfig
    command: str
    storage: Storage
    bare: bool = False  # no config file and no --set: everything is a default
    captions: str | None = None  # `pretrain --captions`
    facts: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ the checks
def check_storage_endpoint(ctx: Context) -> str:
    url = ctx.cfg.storage.endpoint_url
    if not url:
        return "AWS (or AWS_ENDPOINT_URL)"
    reason = unreachable(url)
    if reason:
        raise Failed(f"field 'storage.endpoint_url': cannot reach {url} ({reason})")
    return url


def _domains(ctx: Context, field_name: str, domains: list[Any]) -> str:
    from near_ray.data.collections import domain_uris

    if not domains:
        if ctx.bare:
            raise Failed(f"no config given (--config FILE) and {field_name} is empty: no images to work on; write a "
                         "run config naming your domains (name, uri, meta_class; see configs/run.yaml)")
        raise Failed(f"{field_name}: no domains configured (each needs a name and a uri)")
    found = []
    for d in domains:
        where = f"manifest {d.manifest}" if d.manifest else d.uri
        try:
            first = next(iter(domain_uris(d, ctx.cfg, ctx.storage)), None)
        except NearRayError as e:
            raise Failed(f"{field_name}[{d.name}]: {e}") from None
        if first is None:
            extensions = "" if d.manifest else f" (extensions {', '.join(ctx.cfg.data.image_extensions)})"
            raise Failed(f"{field_name}[{d.name}]: no images in {where}{extensions}")
        found.append(d.name)
    return f"{', '.join(found)}: images found"


def check_domains(ctx: Context) -> str:
    return _domains(ctx, "data.domains", ctx.cfg.data.domains)


def check_classify_domains(ctx: Context) -> str:
    cc = ctx.cfg.classify
    return _domains(ctx, "classify.domains" if cc.domains else "data.domains", cc.domains or ctx.cfg.data.domains)


def check_workdir(ctx: Context) -> str:
    """A probe object written and deleted below the workdir (nothing stays behind)."""
    workdir = ctx.cfg.storage.workdir
    if is_s3(workdir):
        bucket, _ = split_s3(workdir)
        probe = join(workdir, f"_preflight/{uuid.uuid4().hex}")
        try:
            ctx.storage.write_bytes(probe, b"near-ray preflight")
            ctx.storage.delete(probe)
        except StorageError as e:
            raise Failed(f"storage.workdir: bucket '{bucket}' is not usable: {e}") from None
        except Exception as e:  # a botocore error on the delete: the role may write but not delete
            raise Failed(f"storage.workdir: cannot delete a probe object below {workdir}: {e}") from None
        return f"{workdir}: writable (probe object written and deleted)"
    # A local workdir that does not exist yet is made by the first stage: its nearest existing folder must take it.
    folder = Path(workdir).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise Failed(f"storage.workdir: {folder} is a file, not a folder")
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=".near-ray-preflight-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise Failed(f"storage.workdir: cannot write in {folder}: {e.strerror or e}") from None
    return f"{workdir}: writable" + ("" if folder == Path(workdir).absolute() else f" (to be made in {folder})")


def check_backend(ctx: Context) -> str:
    from near_ray.config.backends import BackendUnavailable

    try:  # each backend's own check (near_ray.config.backends)
        return ctx.cfg.label.backend.check_installed(ctx.storage.exists)
    except BackendUnavailable as e:
        raise Failed(str(e)) from None


def check_labels(ctx: Context) -> str:
    uri = ctx.cfg.paths.labels
    if not ctx.storage.exists(uri):
        raise Failed(f"{uri}: no labels table for refine to read: run `near-ray label` first (same storage.workdir)")
    return f"{uri}: present"


def check_refined(ctx: Context) -> str:
    for uri in (ctx.cfg.paths.vocabulary, ctx.cfg.paths.candidates):
        if not ctx.storage.exists(uri):
            raise Failed(f"{uri}: refine's outputs are missing: run `near-ray refine` first (same storage.workdir)")
    return f"{ctx.cfg.paths.refine}: vocabulary and candidate sets present"


def _bundles_present(ctx: Context, bundles: dict[str, str], field_name: str) -> str:
    for who, uri in bundles.items():
        if not ctx.storage.exists(join(uri, "config.json")):
            raise Failed(f"{field_name}: no model bundle at {uri}{who} (no config.json): train one (`near-ray train`) "
                         f"or set {field_name}")
    return ", ".join(sorted(set(bundles.values()))) + ": bundle present"


def check_classify_bundles(ctx: Context) -> str:
    from near_ray.classify.stage import bundle_for

    cc = ctx.cfg.classify
    try:
        bundles = {f" for domain '{d.name}'": bundle_for(ctx.cfg, d.name) for d in cc.domains or ctx.cfg.data.domains}
    except NearRayError as e:
        raise Failed(str(e)) from None
    return _bundles_present(ctx, bundles, "classify.bundles" if cc.bundles else "classify.bundle")


def check_serve_bundles(ctx: Context) -> str:
    s = ctx.cfg.serve
    if s.bundles:
        return _bundles_present(ctx, {f" for domain '{d}'": u for d, u in s.bundles.items()}, "serve.bundles")
    return _bundles_present(ctx, {"": s.bundle or ctx.cfg.paths.bundle(ctx.cfg.train.method)}, "serve.bundle")


def check_truth(ctx: Context) -> str:
    known = [d for d in ctx.cfg.data.domains if d.has_truth]
    if not known:
        raise Failed("data.domains[].truth: no domain has a truth table or a labelled layout; evaluate needs one")
    for d in known:
        if d.truth and not ctx.storage.exists(d.truth):
            raise Failed(f"data.domains[{d.name}].truth: {d.truth} not found")
    return f"truth of {', '.join(d.name for d in known)} present"


def check_edits(ctx: Context) -> str:
    """The vocabulary edits file (refine.edits): read and checked, its names against the labels table when
    there is one; a bad line is named before anything else runs."""
    from near_ray.refine.stage import check_edits as check_edits_file

    edits = check_edits_file(ctx.cfg)
    return f"{ctx.cfg.refine.edits}: {len(edits.edits) if edits is not None else 0} edit(s)"


def check_captions(ctx: Context) -> str:
    flag = "--pretrain-captions" if ctx.command == "train" else "--captions"
    if ctx.captions and not ctx.storage.exists(ctx.captions):
        raise Failed(f"{flag}: {ctx.captions} not found")
    return f"{ctx.captions}: present"


def check_model(ctx: Context) -> str:
    """The starting CLIP's weights are named, and where they come from is said; nothing is downloaded."""
    m = ctx.cfg.model
    from near_ray.model.backbone import BackboneError, backbone_config, is_backbone

    if is_backbone(m.arch):  # an image network: its name must resolve here (nothing is downloaded)
        from near_ray.model.clip import _is_weights_uri

        try:
            backbone_config(m.arch)
        except BackboneError as e:
            raise Failed(str(e)) from None
        except Exception as e:  # noqa: BLE001 (a network that builds but cannot embed an image)
            raise Failed(f"model.arch: {m.arch} cannot serve as an image tower ({type(e).__name__}: {e})") from None
        if m.pretrained != RANDOM_INIT and not _is_weights_uri(m.pretrained):
            raise Failed(f"model.pretrained: '{m.pretrained}' is not a weights file; {m.arch} reads its weights "
                         f"from a file (a Hugging Face model from its folder), or '{RANDOM_INIT}'")
    if m.pretrained == RANDOM_INIT:
        return (f"{m.arch} from random weights (model.pretrained: {RANDOM_INIT}, asked for by name): its names mean "
                "little until trained")
    from near_ray.model.clip import _is_weights_uri, builtin_configs, shipped_weights

    if _is_weights_uri(m.pretrained):
        if not ctx.storage.exists(m.pretrained):
            raise Failed(f"model.pretrained: weights file {m.pretrained} not found")
        return f"{m.arch} with weights {m.pretrained}"
    if m.arch in builtin_configs():
        shipped = shipped_weights(m.arch, m.pretrained)
        if not shipped:
            raise Failed(f"model.pretrained: '{m.pretrained}' is not a tag near_ray ships for {m.arch}, nor a weights "
                         f"file (or '{RANDOM_INIT}')")
        return f"{m.arch} with the weights near_ray ships ({Path(shipped).name})"
    return hub_weights(m.arch, m.pretrained)


def hub_weights(arch: str, tag: str) -> str:
    """Where an open_clip tag's weights come from: the local Hugging Face cache, or the hub at first use."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    if not open_clip.get_model_config(arch) and not is_s3(arch) and not Path(arch).is_file():
        raise Failed(f"model.arch: '{arch}' is not an open_clip model nor a model config file")
    source = get_pretrained_cfg(arch, tag)
    if not source:
        tags = list_pretrained_tags_by_model(arch)
        raise Failed(f"model.pretrained: '{tag}' is not a pretrained tag of {arch} "
                     f"({', '.join(tags) if tags else 'it has none: name a weights file'}; or '{RANDOM_INIT}')")
    hub = (source.get("hf_hub") or "").rstrip("/")
    if hub:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            cached = try_to_load_from_cache(hub, filename)
            if isinstance(cached, str):
                return f"{arch} '{tag}': in the local Hugging Face cache ({cached})"
        if constants.HF_HUB_OFFLINE:
            raise Failed(f"model.pretrained: '{tag}' weights of {arch} are not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: stage them (docs/configuration.md)")
        return (f"{arch} '{tag}': fetched from the Hugging Face hub (hf-hub:{hub}) by each process that builds the "
                f"model, into {constants.HF_HUB_CACHE}; not checked here (no download). On a cluster, stage them once: "
                "`near-ray stage-weights --out s3://…/weights.safetensors`, then model.pretrained: that file")
    return f"{arch} '{tag}': fetched from {source.get('url')} at first use; not checked here (no download)"


def check_mllm(ctx: Context) -> str:
    from near_ray.label.probe import ProbeError, probe

    lc = ctx.cfg.label
    if lc.backend.not_probed is not None:
        return f"{lc.backend.type}: not probed ({lc.backend.not_probed})"
    if ctx.command == "run" and ctx.cfg.refine.edits and ctx.storage.exists(ctx.cfg.paths.label_summary):
        # a re-run after the review pays no MLLM call: its labels are on storage, and an image still
        # missing one is asked by the label stage, whose failures are rows a later run asks again
        return "not probed: a re-run with vocabulary edits over the labels already on storage"
    try:
        result = probe(lc.backend, lc.prices)
    except ProbeError as e:
        raise Failed(str(e)) from None
    ctx.facts.update(result)
    return (f"{lc.backend.model_name} at {lc.backend.base_url} answered in {result['latency_s']:.2f} s: "
            f"{result['input_tokens']} + {result['output_tokens']} tokens, ${result['cost_usd']:.6f}"
            + (f" ({result['note']})" if result.get("note") else ""))


def check_estimate(ctx: Context) -> str:
    from near_ray.estimate import cpu_estimate

    line, seconds = cpu_estimate(ctx.cfg, ctx.command, ctx.storage)
    ctx.facts["estimated_s"] = round(seconds, 1)
    return line


CHECKS: dict[str, Callable[[Context], str]] = {
    "storage endpoint": check_storage_endpoint, "domains": check_domains, "classify domains": check_classify_domains,
    "workdir": check_workdir, "backend": check_backend, "labels": check_labels, "refine outputs": check_refined,
    "bundles": check_classify_bundles, "serve bundles": check_serve_bundles, "truth": check_truth,
    "captions": check_captions, "edits": check_edits, "model": check_model, "cpu estimate": check_estimate, "mllm": check_mllm,
}


def checks_for(cfg: RunConfig, command: str, write_config: bool = False, captions: str | None = None) -> list[str]:
    """The checks ``command`` needs, cheap ones first and the paid MLLM request last (``write_config``: serve
    only writes a deploy file; ``captions``: train pretrains its starting CLIP first, from these captions)."""
    from near_ray.train.methods import DIRECT_MLLM

    routes = cfg.classify.route_below is not None or cfg.classify.route_fraction is not None
    classifies = cfg.classify.enabled or bool(cfg.classify.domains)
    plans = {
        "label": ["domains", "workdir", "backend", "mllm"],
        "refine": ["workdir", "labels", "model", "cpu estimate"],
        "train": ["workdir", "refine outputs", *(["captions"] if captions else ["model"]), "cpu estimate"],
        "pretrain": ["workdir", "captions"],  # pretraining starts from random weights by definition
        "classify": ["classify domains", "workdir", "bundles", *(["backend", "mllm"] if routes else [])],
        "evaluate": ["workdir", "truth", *(["backend", "mllm"] if DIRECT_MLLM in cfg.eval.methods else [])],
        "serve": [] if write_config else ["serve bundles"],
        "review": ["workdir", "labels", "refine outputs"],
        "export": [],  # the table it exports is checked by the export itself, before any file is written
        "run": ["domains", *(["classify domains"] if classifies else []), "workdir", "backend", "model",
                "cpu estimate", "mllm"],
    }
    if command not in plans:
        return []
    # a bad line of the edits file is the user's last change: named first, before checks of older work
    edits = ["edits"] if cfg.refine.edits and command in ("refine", "train", "run") else []
    return ["storage endpoint", *edits, *plans[command]]


def run_checks(ctx: Context, names: list[str], stop_at_first: bool = True) -> list[Check]:
    results = []
    for name in names:
        t0 = time.monotonic()
        facts: dict[str, Any] = {}
        try:
            ctx.facts = facts
            results.append(Check(name, True, CHECKS[name](ctx), time.monotonic() - t0, facts))
        except Failed as e:
            results.append(Check(name, False, str(e), time.monotonic() - t0, facts))
            if stop_at_first:
                break
    return results


def preflight(cfg: RunConfig, command: str, source: str, *, bare: bool = False, captions: str | None = None,
              write_config: bool = False) -> list[Check]:
    """The checks ``command`` needs, before any work; the first failure raises one line naming what to fix."""
    names = checks_for(cfg, command, write_config, captions)
    if not names:
        return []
    ctx = Context(cfg, command, storage_for(cfg), bare=bare, captions=captions)
    t0 = time.monotonic()
    results = run_checks(ctx, names)
    failed = next((r for r in results if not r.ok), None)
    if failed:
        if bare and not failed.detail.startswith("no config given"):
            raise PreflightError(f"no config given (--config FILE), every field is its default: {failed.detail}")
        raise PreflightError(failed.detail if bare else f"{source}: {failed.detail}")
    log.info("preflight: %d checks passed in %.1f s (%s)", len(results), time.monotonic() - t0,
             ", ".join(f"{r.name} {r.seconds:.1f} s" for r in results))
    from near_ray.estimate import LONG_S

    for r in results:  # what a person should know before the work starts
        if r.name in ("model", "mllm") or r.facts.get("estimated_s", 0) >= LONG_S:
            log.info("preflight: %s: %s", r.name, r.detail)
    return results


def unreachable(url: str) -> str | None:
    """Why nothing answers at ``url``'s host and port (a TCP connect), or None when something does."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname:
        return "not a URL with a host"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S):
            return None
    except ValueError as e:  # a port that is not a number
        return str(e)
    except OSError as e:
        return e.strerror or type(e).__name__

