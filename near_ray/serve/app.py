"""The Ray Serve application for model bundles: builder, `serve deploy` config, and `near-ray serve`.

One builder, ``build_app(args)``, makes the application from our ``serve`` config fields. ``near-ray
serve`` calls it in-process; ``near-ray serve --write-config FILE`` writes a Serve config whose
``import_path`` points at it, which ``serve deploy`` and the KubeRay RayService (``serveConfigV2``)
run unchanged. Model updates without downtime: change ``user_config`` (``{"bundle": URI}``) of the
``Classifier`` deployment, or run ``update_bundle``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import yaml

from near_ray.config import RunConfig, ServeConfig, StorageConfig
from near_ray.errors import NearRayError

log = logging.getLogger(__name__)

IMPORT_PATH = "near_ray.serve.app:build_app"
# Fields only the model deployment needs: kept out of the ingress's init args, so that a bundle
# update changes nothing but the Classifier's user_config and needs no ingress restart.
_MODEL_FIELDS = ("bundle", "bundles", "batcher", "max_batch_size", "batch_wait_timeout_s", "abstain_threshold")


def model_user_config(settings: ServeConfig) -> dict[str, Any]:
    """The Classifier's ``user_config``: what can change on a running deployment."""
    return {
        "bundle": settings.bundle,
        "bundles": dict(settings.bundles),
        "batcher": settings.batcher,
        "max_batch_size": settings.max_batch_size,
        "batch_wait_timeout_s": settings.batch_wait_timeout_s,
        "abstain_threshold": settings.abstain_threshold,
    }


def classifier_options(settings: ServeConfig) -> dict[str, Any]:
    return {
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "initial_replicas": max(settings.min_replicas, 1),
            "max_replicas": max(settings.max_replicas, settings.min_replicas),
            "target_ongoing_requests": settings.target_ongoing_requests,
        },
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "user_config": model_user_config(settings),
    }


def ingress_options(settings: ServeConfig) -> dict[str, Any]:
    if settings.colocate:  # the model lives in the ingress: its resources, autoscaling and user_config
        return {**classifier_options(settings), "max_ongoing_requests": settings.ingress_max_ongoing_requests}
    return {
        "num_replicas": settings.ingress_replicas,
        "ray_actor_options": {"num_cpus": settings.ingress_cpus},
        "max_ongoing_requests": settings.ingress_max_ongoing_requests,
    }


def application(settings: ServeConfig, storage: StorageConfig | None = None, secret_env: dict[str, str] | None = None) -> Any:
    """The bound application: Ingress -> Classifier. ``secret_env`` reaches only the ingress's environment."""
    from near_ray.serve.api import Ingress
    from near_ray.serve.model import Classifier

    options = ingress_options(settings)
    if settings.colocate:
        if secret_env:
            options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(secret_env)}
        return Ingress.options(**options).bind(None, _ingress_settings(settings), storage or StorageConfig())
    model = Classifier.options(**classifier_options(settings)).bind(storage or StorageConfig())
    if secret_env:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(secret_env)}
    return Ingress.options(**options).bind(model, _ingress_settings(settings))


def _ingress_settings(settings: ServeConfig) -> ServeConfig:
    # The model's fields stay out of the ingress's init args: a bundle update then changes only the
    # model's user_config, and the ingress keeps running.
    return settings.model_copy(update={f: ServeConfig.model_fields[f].get_default(call_default_factory=True)
                                       for f in _MODEL_FIELDS})


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path``): args = the ``serve`` config fields + ``storage``."""
    args = dict(args or {})
    storage = StorageConfig.model_validate(args.pop("storage", None) or {})
    return application(ServeConfig.model_validate(args), storage)


def resolved_settings(cfg: RunConfig) -> ServeConfig:
    """The serve section with the default bundle filled in: ``{workdir}/bundles/<train.method>``."""
    settings = cfg.serve.model_copy()
    if not settings.bundles and not settings.bundle:
        from near_ray.chosen import served_method

        settings.bundle = cfg.paths.bundle(served_method(cfg))
    return settings


def deploy_config(cfg: RunConfig) -> dict[str, Any]:
    """A `serve deploy` config (Serve's ServeDeploySchema) for this run's serve section."""
    settings = resolved_settings(cfg)
    app: dict[str, Any] = {
        "name": settings.app_name,
        "route_prefix": settings.route_prefix,
        "import_path": IMPORT_PATH,
        "args": {**settings.model_dump(mode="json"), "storage": cfg.storage.model_dump(mode="json")},
        "deployments": ([] if settings.colocate else [{"name": "Classifier", **classifier_options(settings)}])
        + [{"name": "Ingress", **ingress_options(settings)}],
    }
    if settings.runtime_env:
        app["runtime_env"] = settings.runtime_env
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port, "request_timeout_s": _proxy_timeout(settings)},
        "applications": [app],
    }


def _proxy_timeout(settings: ServeConfig) -> float:
    # A little above the ingress's own deadline, so that clients get its JSON 504 rather than the proxy's.
    return settings.request_timeout_s + 5.0


def write_deploy_config(cfg: RunConfig, uri: str) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    from near_ray.storage import storage_for

    config = deploy_config(cfg)
    ServeDeploySchema.model_validate(config)  # refuse to write what `serve deploy` would reject
    storage_for(cfg).write_text(uri, yaml.safe_dump(config, sort_keys=False))
    return config


def check_bundles(cfg: RunConfig, settings: ServeConfig) -> None:
    """Fail fast with the URI, instead of Serve retrying a replica that cannot load its bundle."""
    from near_ray.serve.model import bundle_sources
    from near_ray.storage import join, storage_for

    storage = storage_for(cfg)
    for _, uri in bundle_sources({"bundle": settings.bundle, "bundles": settings.bundles}):
        if not storage.exists(join(uri, "config.json")):
            raise NearRayError(f"serve: {uri} is not a model bundle (no config.json); train one or set serve.bundle")


def _secret_env(settings: ServeConfig) -> dict[str, str] | None:
    name = settings.auth_token_env
    return {name: os.environ[name]} if name and os.environ.get(name) else None


def run_serve(cfg: RunConfig, write_config: str | None = None, block: bool = True) -> dict[str, Any]:
    """Start the application on Ray Serve (HTTP on serve.host:serve.port), or only write its deploy config."""
    if write_config:
        write_deploy_config(cfg, write_config)
        log.info("wrote Serve config to %s (run it with: serve deploy %s)", write_config, write_config)
        return {"serve_config": write_config}
    from ray import serve

    from near_ray.ray_session import ensure_ray, joins_a_cluster

    settings = resolved_settings(cfg)
    check_bundles(cfg, settings)
    joined = joins_a_cluster()
    if joined and settings.host in ("127.0.0.1", "localhost"):
        log.warning("serve.host is %s: on a cluster only processes on its nodes reach the app "
                    "(serve.host=0.0.0.0 serves other hosts)", settings.host)
    if settings.direct_ingress and not joined:
        # Read by Serve's controller and replicas when they start: a cluster started here inherits it.
        os.environ[DIRECT_INGRESS_ENV] = "1"
    ensure_ray()
    if settings.direct_ingress:
        check_direct_ingress(settings)  # before anything is deployed
    http = {"host": settings.host, "port": settings.port, "request_timeout_s": _proxy_timeout(settings)}
    serve.start(http_options=http)
    # The token reaches the ingress through its runtime env only on a cluster started here: on a shared
    # cluster that env is shown by Serve's dashboard and API, so the nodes' own environment holds it.
    app = application(settings, cfg.storage, None if joined else _secret_env(settings))
    serve.run(app, name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
    url = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}"
    log.info("serving %s at %s (docs at %s/docs)", settings.bundles or settings.bundle, url, url)
    out: dict[str, Any] = {"url": url, "app": settings.app_name}
    if settings.direct_ingress:
        out["direct_urls"] = direct_urls(settings)
        log.info("ingress replicas answering directly: %s", ", ".join(out["direct_urls"]))
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(settings.app_name)
    return out


DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def check_direct_ingress(settings: ServeConfig) -> None:
    """Refuse serve.direct_ingress on a cluster whose head node (where Serve's controller runs) lacks
    RAY_SERVE_ENABLE_DIRECT_INGRESS=1: Serve would quietly route through its proxies only."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]), None)
    strategy = NodeAffinitySchedulingStrategy(head, soft=True) if head else "DEFAULT"
    probe = ray.remote(num_cpus=0)(lambda: os.environ.get(DIRECT_INGRESS_ENV, ""))
    value = ray.get(probe.options(scheduling_strategy=strategy).remote(), timeout=120)
    if value != "1":
        raise NearRayError(
            f"serve.direct_ingress: the Ray cluster's head node runs without {DIRECT_INGRESS_ENV}=1 (it has "
            f"{value!r}), so Serve would answer only through its proxies; start the cluster (`ray start`, or the "
            "head and worker containers) with it, or set serve.direct_ingress: false"
        )


def direct_urls(settings: ServeConfig, timeout_s: float = 60.0) -> list[str]:
    """The base URLs at which the application's ingress replicas answer HTTP themselves.

    Read from Serve's controller, which lists each ingress replica's own port once direct ingress is
    on (and the proxies' port otherwise). A replica binds ``serve.host``, so a loopback host gives
    loopback URLs whatever the node's address. The list is of this moment: replicas that autoscaling
    adds or replaces get ports of their own (a load balancer in front reads the controller's target
    groups, as Serve's HAProxy mode does).
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    started = time.monotonic()
    while True:
        groups = [g for g in ray.get(controller.get_target_groups.remote(settings.app_name)) if g.protocol == "HTTP"]
        # The app's group lists its ingress replicas (SERVE_REPLICA::app#Ingress#id), or the proxies
        # while it has none running.
        own = [t for g in groups if g.app_name == settings.app_name for t in g.targets if t.name.startswith("SERVE_REPLICA")]
        if own:
            host = settings.host if settings.host not in ("0.0.0.0", "::") else None
            prefix = settings.route_prefix.rstrip("/")
            return [f"http://{host or t.ip}:{t.port}{prefix}" for t in own]
        waited = time.monotonic() - started
        if groups and all(not g.app_name for g in groups) and waited > min(10.0, timeout_s):
            # Only the proxies' group (app_name ""): this cluster's Serve runs without direct ingress.
            raise NearRayError(
                f"serve.direct_ingress: the Ray cluster serving '{settings.app_name}' does not run Serve's direct "
                f"ingress; start the cluster (`ray start`, or the head and worker containers) with {DIRECT_INGRESS_ENV}=1"
            )
        if waited > timeout_s:
            raise NearRayError(f"serve.direct_ingress: no ingress replica of '{settings.app_name}' listed a port within {timeout_s:.0f} s")
        time.sleep(0.5)


def update_bundle(settings: ServeConfig, bundle: str, storage: StorageConfig | None = None) -> None:
    """Swap the served bundle of a running application; in-flight requests finish on the old one."""
    from ray import serve

    new = settings.model_copy(update={"bundle": bundle, "bundles": {}})
    app = application(new, storage, _secret_env(new))
    serve.run(app, name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
