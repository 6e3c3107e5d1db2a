"""`near-ray …`: each subcommand parses flags, loads the run config and calls one stage.

Every command accepts ``--config FILE`` and any number of ``--set section.key=value``. Stage code is
imported lazily so that, e.g., ``near-ray annotator`` never imports torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from near_ray import __version__
from near_ray.config import RunConfig, load_config
from near_ray.errors import NearRayError
from near_ray.train.methods import METHODS, method_list

log = logging.getLogger("near_ray")


# Commands of the offline stand-ins: their config may carry the demo's `synth` section.
_SIM_COMMANDS = ("synth", "annotator", "demo")
# Commands whose work the preflight checks first (near_ray.preflight.checks_for); `validate --for` picks one.
_PREFLIGHT_COMMANDS = ("run", "label", "refine", "train", "classify", "evaluate", "serve", "pretrain")


def _config(args: argparse.Namespace) -> RunConfig:
    """The run config of this invocation, loaded once (``main`` loads it before the preflight)."""
    if getattr(args, "cfg", None) is not None:
        return args.cfg
    if args.command in _SIM_COMMANDS:
        from near_ray.sim.config import DemoConfig

        return load_config(args.config, args.set, schema=DemoConfig)
    cfg = load_config(args.config, args.set)
    if getattr(args, "edits", None):  # --edits FILE: refine.edits
        cfg.refine.edits = args.edits
    return cfg


def _source(args: argparse.Namespace) -> str:
    source = args.config or "<defaults>"
    return f"{source} with --set {' '.join(args.set)}" if args.set else source


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------ commands
def cmd_synth(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.sim.synth import generate
    from near_ray.storage import storage_for

    cfg = _config(args)
    s = cfg.synth  # the flags override the config's synth section, whose defaults live in SynthConfig
    summary = generate(
        out=args.out,
        domains=[d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else s.domains,
        species=s.species if args.species is None else args.species,
        images_per_species=s.images_per_species if args.images_per_species is None else args.images_per_species,
        image_size=s.image_size if args.image_size is None else args.image_size,
        seed=s.seed if args.seed is None else args.seed,
        test_fraction=s.test_fraction if args.test_fraction is None else args.test_fraction,
        storage=storage_for(cfg),
    )
    return summary


def cmd_annotator(args: argparse.Namespace) -> None:
    from near_ray.sim.annotator import serve_annotator
    from near_ray.storage import storage_for

    cfg = _config(args)
    serve_annotator(
        truth=args.truth,
        profile=args.profile,
        host=args.host,
        port=args.port,
        seed=args.seed,
        faults=args.faults,
        storage=storage_for(cfg),
    )


def cmd_label(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.label.stage import run_label

    return run_label(_config(args))


def cmd_refine(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.refine.stage import run_refine

    return run_refine(_config(args))


def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.train.pretrain import pretrain

    return pretrain(_config(args), captions=args.captions, out=args.out)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.config import ConfigError
    from near_ray.train.methods import get_method, needs_text, warn_experimental
    from near_ray.train.pretrain import pretrain
    from near_ray.train.stage import export_zero_shot, run_train

    cfg = _config(args)
    if not args.method and not args.pretrain_captions:
        if cfg.train.select:  # chosen without labels among the candidates, then trained on everything
            from near_ray.train.select import run_select

            choice = run_select(cfg)
            cfg.train.method = choice["chosen"]
            return {"select": choice, cfg.train.method: run_train(cfg)}
        return run_train(cfg)
    if bad := [m for m in args.method or [] if not cfg.model.has_text and needs_text(m, cfg.train.prototype_weight)]:
        raise ConfigError(f"--method {', '.join(bad)}: model.arch {cfg.model.arch} has no text side to classify with")
    warn_experimental(args.method)  # a candidate measured and not adopted: said, then trained
    out: dict[str, Any] = {}
    if args.pretrain_captions:  # the initial CLIP first, then fine-tune from it
        out["pretrain"] = pretrain(cfg, args.pretrain_captions, None)
        cfg.model.pretrained = out["pretrain"]["weights"]
    for method in args.method or [cfg.train.method]:
        if not get_method(method).trained:
            out[method] = {"bundle": export_zero_shot(cfg)}
            continue
        method_cfg = cfg.model_copy(deep=True)
        method_cfg.train.method = method
        out[method] = run_train(method_cfg)
    return out


def _one_bundle(section: Any, name: str, bundle: str) -> None:
    """``--bundle``: this bundle for every domain, in place of the config's ``bundle`` and ``bundles``."""
    if section.bundles:
        log.info("--bundle %s replaces %s.bundles (%s)", bundle, name, ", ".join(sorted(section.bundles)))
        section.bundles = {}
    section.bundle = bundle


def cmd_classify(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.classify.stage import run_classify

    cfg = _config(args)
    if args.bundle:
        _one_bundle(cfg.classify, "classify", args.bundle)
    return run_classify(cfg)


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.eval.stage import run_evaluate

    return run_evaluate(_config(args), out=args.out)


def cmd_review(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.eval.review import write_review

    return {"review": write_review(_config(args), out=args.out)}


def cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.export import run_export

    return run_export(_config(args), args.format, args.out, source=args.source, domains=args.domain or None,
                      copy=args.copy, local_root=args.local_root)  # fmt: skip


def cmd_run(args: argparse.Namespace) -> None:
    """The closing summary is for a person; the JSON one is at {workdir}/run_summary.json."""
    from near_ray.pipeline import closing_summary, run_pipeline

    cfg = _config(args)
    args.summary = run_pipeline(cfg, serve=args.serve)  # a job's last line reads its facts
    print("\n" + closing_summary(cfg, args.summary))


def cmd_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.data.benchmark import prepare_benchmark

    cfg = _config(args)
    out: dict[str, Any] = {"benchmark": prepare_benchmark(cfg, args.dataset, args.root, args.domain)}
    if not args.prepare_only:  # the domains are the dataset's now: the run's checks, then the run
        from near_ray.pipeline import run_pipeline
        from near_ray.preflight import preflight

        preflight(cfg, "run", _source(args))
        out["pipeline"] = run_pipeline(cfg)
    return out


def cmd_demo(args: argparse.Namespace) -> None:
    from near_ray.demo import run_demo

    run_demo(out=args.out, overrides=args.set, config=args.config)


def cmd_validate(args: argparse.Namespace) -> int:
    """The resolved config (secrets masked), then every check the command would run, each with its result."""
    from near_ray.config import dump_config
    from near_ray.preflight import Context, checks_for, run_checks
    from near_ray.storage import storage_for

    cfg = _config(args)
    print(f"# {_source(args)}, resolved (secrets masked)")
    print(dump_config(cfg, masked=True).rstrip())
    ctx = Context(cfg, args.command_to_check, storage_for(cfg), bare=not args.config and not args.set)
    results = run_checks(ctx, checks_for(cfg, args.command_to_check), stop_at_first=False)
    print(f"\n# checks for `near-ray {args.command_to_check}`")
    for r in results:
        print(f"{'ok' if r.ok else 'FAILED':6} {r.name:17} {r.seconds:6.2f} s  {r.detail}")
    failed = [r.name for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 2 if failed else 0


def cmd_stage_weights(args: argparse.Namespace) -> dict[str, Any]:
    from near_ray.model.staging import stage_weights
    from near_ray.storage import storage_for

    cfg = _config(args)
    out = stage_weights(cfg.model, args.out, storage_for(cfg))
    log.info("stage-weights: written %s; read them with model.arch: %s and model.pretrained: %s", args.out,
             out["arch"], args.out)
    return out


def cmd_serve(args: argparse.Namespace) -> dict[str, Any] | None:
    from near_ray.serve.app import run_serve

    cfg = _config(args)
    if args.bundle:
        _one_bundle(cfg.serve, "serve", args.bundle)
    if args.detach and not args.write_config:
        from near_ray.job import wait_until_ready

        return wait_until_ready(cfg, run_serve(cfg, block=False), args.wait_s)
    run_serve(cfg, write_config=args.write_config, block=not args.write_config)
    return None


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="near-ray", description="Vocabulary-free fine-grained recognition (NeaR) on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own logs (workers, Ray Data progress) on the console")
    parser.add_argument("--version", action="version", version=f"near-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], None], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", "-c", help="run config (YAML)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config field")
        p.set_defaults(fn=fn)
        return p

    p = add("synth", cmd_synth, "write the synthetic fine-grained benchmark (images, truth, taxonomy, captions)")
    p.add_argument("--out", required=True, help="output URI (s3://… or folder)")
    p.add_argument("--domains", help="comma-separated domains (default synth.domains)")
    p.add_argument("--species", type=int, help="species per domain (default synth.species)")
    p.add_argument("--images-per-species", type=int, help="default synth.images_per_species")
    p.add_argument("--image-size", type=int, help="default synth.image_size")
    p.add_argument("--test-fraction", type=float, help="default synth.test_fraction")
    p.add_argument("--seed", type=int, help="default synth.seed")

    p = add("stage-weights", cmd_stage_weights, "fetch the starting CLIP's weights once (model.arch, model.pretrained) "
            "and write them as one safetensors file, for model.pretrained: s3://… (read once per node)")
    p.add_argument("--out", required=True, help="where the weights go (s3://…/name.safetensors or a local path)")

    p = add("annotator", cmd_annotator, "run the simulated MLLM annotator (OpenAI-compatible HTTP server)")
    p.add_argument("--truth", required=True, help="URI of a synthetic benchmark (or its truth.parquet)")
    p.add_argument("--profile", default="strong", help="noise profile name or YAML/JSON file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", default=None, help="fault injection as JSON or a file, e.g. '{\"rate_429\": 0.1}'")

    add("label", cmd_label, "label images with an MLLM (Ray Data + vLLM / OpenAI-compatible endpoint)")
    p = add("refine", cmd_refine, "vocabulary, CLIP embeddings, kNN and candidate sets")
    p.add_argument("--edits", default=None, help="vocabulary edits (YAML) to apply: refine.edits, see docs/refine.md")
    p = add("pretrain", cmd_pretrain, "contrastive CLIP pretraining on an image-caption table")
    p.add_argument("--captions", required=True, help="URI of captions.parquet (from `near-ray synth`)")
    p.add_argument("--out", default=None, help="where to write the weights (default {workdir}/pretrained)")
    p = add("train", cmd_train, "CLIP fine-tuning (train.method) with Ray Train and model bundle export")
    p.add_argument("--method", action="append", default=[], choices=list(METHODS), metavar="METHOD",
                   help=f"train these methods in turn (repeatable; default train.method): {method_list()}")  # fmt: skip
    p.add_argument("--pretrain-captions", default=None, help="captions.parquet: contrastive pretraining of the initial CLIP first")
    p.add_argument("--edits", default=None, help="vocabulary edits refine applied (refine.edits): checked, their names kept")
    p = add("classify", cmd_classify, "name a whole collection with a bundle (Ray Data), the CLIP -> MLLM cascade")
    p.add_argument("--bundle", default=None, help="one bundle URI for every domain, in place of classify.bundle and classify.bundles "
                   "(default: those, else {workdir}/bundles/<train.method>)")
    p = add("evaluate", cmd_evaluate, "cACC / sACC / NMI / ARI with baselines; report.json, report.md, plots")
    p.add_argument("--out", default=None, help="report folder (default {workdir}/report)")
    p = add("review", cmd_review, "the review page: names, examples, merges, prunings, suspect images (static HTML)")
    p.add_argument("--out", default=None, help="where to write the page (default {workdir}/review/index.html)")
    p = add("export", cmd_export, "the predictions (or labels) table as an ImageFolder tree, Label Studio tasks or a "
            "FiftyOne dataset")  # fmt: skip
    p.add_argument("--format", required=True, choices=["imagefolder", "labelstudio", "fiftyone"])
    p.add_argument("--out", required=True, help="an empty folder or S3 prefix")
    p.add_argument("--source", default="predictions", choices=["predictions", "labels"],
                   help="the predictions table (default), or the labels table: each image's majority MLLM answer")
    p.add_argument("--domain", action="append", default=[], help="only this domain (repeatable; default all)")
    p.add_argument("--copy", action="store_true", help="copy local images instead of linking them")
    p.add_argument("--local-root", default=None, help="labelstudio: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT for "
                   "local images (default: the deepest folder holding them all)")  # fmt: skip
    p = add("run", cmd_run, "the whole pipeline: label → refine → train → evaluate (with truth) → classify → review")
    p.add_argument("--serve", action="store_true", help="start the Serve app at the end")
    p.add_argument("--edits", default=None, help="vocabulary edits (YAML) to apply: refine.edits, see docs/refine.md")
    p = add("benchmark", cmd_benchmark, "FineR's protocol on a fine-grained dataset in its native layout: discovery "
            "manifest, test truth, then label -> refine -> train -> evaluate")  # fmt: skip
    p.add_argument("--dataset", required=True, help="cub200, stanford_cars, stanford_dogs, flowers102, oxford_pets, folder or auto")
    p.add_argument("--root", required=True, help="the dataset's root folder (s3://… or local), in its native layout")
    p.add_argument("--domain", default=None, help="domain name (default: birds, cars, dogs, flowers, pets)")
    p.add_argument("--prepare-only", action="store_true", help="write the discovery manifest and truth, then stop")
    p = add("demo", cmd_demo, "the offline end-to-end demo on the synthetic benchmark")
    p.add_argument("--out", default="demo_out", help="output folder")
    p = add("serve", cmd_serve, "serve a model bundle with Ray Serve")
    p.add_argument("--bundle", default=None, help="one bundle URI for every domain, in place of serve.bundle and serve.bundles "
                   "(default: those, else {workdir}/bundles/<train.method>)")
    p.add_argument("--write-config", default=None, help="write a `serve deploy` config file here and exit")
    p.add_argument("--detach", action="store_true",
                   help="deploy, wait until the app answers /readyz, exit and leave it running (jobs/serve.py)")
    p.add_argument("--wait-s", type=float, default=600.0, help="with --detach: how long to wait for readiness")
    p = add("validate", cmd_validate, "print the resolved config (secrets masked) and run every preflight check")
    p.add_argument("--for", dest="command_to_check", default="run", choices=_PREFLIGHT_COMMANDS,
                   help="the command whose checks to run (default run)")
    return parser


def _error(command: str, e: Exception) -> None:
    """The one line a user sees for an error: its message, whatever newlines it carried."""
    message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    print(f"near-ray {command}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None, job: bool = False) -> int:
    """``near-ray …``; with ``job`` (the entry points in jobs/), the run's metadata is logged around it."""
    from near_ray.ray_session import prefer_loopback

    prefer_loopback()  # before any stage imports ray
    args = build_parser().parse_args(argv)
    try:
        args.cfg = _config(args)  # validated before any stage code runs or writes
    except NearRayError as e:
        _error(args.command, e)
        return 2
    cfg = args.cfg
    from near_ray.console import setup_console

    setup_console(args.verbose)
    if args.command == "validate":
        return args.fn(args)
    try:  # what the command needs, checked before Ray starts or the MLLM is paid (near_ray/preflight.py)
        if getattr(args, "bundle", None):
            _one_bundle(cfg.classify if args.command == "classify" else cfg.serve, args.command, args.bundle)
        from near_ray.preflight import preflight

        captions = getattr(args, "captions", None) or getattr(args, "pretrain_captions", None)
        preflight(cfg, args.command, _source(args), bare=not args.config and not args.set, captions=captions,
                  write_config=bool(getattr(args, "write_config", None)))
    except NearRayError as e:
        _error(args.command, e)
        return 2
    record = None
    try:
        if job:
            from near_ray.job import JobRecord

            record = JobRecord.start(args.command, args.config, cfg)
        result = args.fn(args)
    except NearRayError as e:
        _error(args.command, e)
        if record:
            record.finish("FAILED", error=str(e))
        return 2
    except KeyboardInterrupt:
        print(f"near-ray {args.command}: interrupted", file=sys.stderr)
        if record:
            record.finish("STOPPED", error="interrupted (ray job stop, SIGTERM or Ctrl-C); resubmit to continue")
        return 130
    except Exception as e:  # a bug, not a user error: the traceback follows, after the job's last line
        if record:
            record.finish("FAILED", error=f"{type(e).__name__}: {e}")
        raise
    if result is not None:
        _print(result)
    if record:  # a command that prints for a person (run) leaves its summary on args for the job's line
        record.finish("SUCCEEDED", result=result if result is not None else getattr(args, "summary", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
