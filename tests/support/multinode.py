"""The whole pipeline on a Ray cluster of three nodes on 127.0.0.1 (tests/test_multinode.py runs this in a process
of its own, so that its cluster is not the test session's).

    python tests/support/multinode.py <benchmark root> <workdir> <annotator base URL> <out.json> <an image> <its domain>

A head node (the driver's, 1 CPU) and two worker nodes of 2 CPUs each, started with Ray's own
``ray.cluster_utils.Cluster``. Every actor the stages start asks for 1.5 CPUs, which only a worker node has and
only once: the stages must spread over both workers to run at all, as they would over a real cluster's GPUs.
Writes which nodes ran each kind of actor (from the GCS actor table, dead actors included) and the run summary.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 150 * 1024 * 1024, "include_log_monitor": False}
SPREAD = 1.5  # CPUs per actor: one fits a worker node (2 CPUs), none the head (1 CPU)


def config(root: str, workdir: str, base_url: str) -> dict:
    """A no-truth run over two domains (the user's case): label, refine, train one method, name the collection."""
    return {
        "storage": {"workdir": workdir},
        "data": {"domains": [{"name": d, "uri": f"{root}/images/{d}", "meta_class": m}
                             for d, m in (("birds", "bird"), ("flowers", "flower"))]},
        "label": {"samples": 2, "pool_size": 2, "actor_cpus": SPREAD,
                  "backend": {"type": "openai", "base_url": base_url, "api_key_env": None}},
        "model": {"arch": "near-tiny", "pretrained": "random"},
        "refine": {"k": 3, "merge_encoder": "none", "embed_actors": 2, "embed_actor_cpus": SPREAD},
        "train": {"num_workers": 2, "cpus_per_worker": SPREAD, "epochs": 2, "warmup_epochs": 1, "batch_size": 8},
        "classify": {"pool_size": 2, "actor_cpus": SPREAD, "batch_size": 8},
        "serve": {"min_replicas": 2, "max_replicas": 2, "cpus_per_replica": SPREAD, "ingress_cpus": 0.1},
    }


def actor_nodes() -> dict[str, list[str]]:
    """Actor class -> the distinct nodes its actors ran on (every actor the cluster started, dead ones too)."""
    from ray._private import state

    nodes: dict[str, set[str]] = defaultdict(set)
    for info in state.actors().values():
        nodes[info["ActorClassName"]].add(info["Address"]["NodeID"])
    return {name: sorted(ids) for name, ids in nodes.items()}


def serve_and_ask(cfg, image: str, domain: str) -> list[dict]:
    """The trained bundle on Serve (two model replicas, one per worker node; one HTTP proxy, on the head: the
    nodes share 127.0.0.1), asked about ``image`` of ``domain`` 20 times once it answers (two minutes at most)."""
    import time

    import httpx
    from ray import serve

    from near_ray.ray_session import free_local_port
    from near_ray.serve.app import run_serve
    from near_ray.storage import Storage

    cfg.serve.port = free_local_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": cfg.serve.port})
    url = run_serve(cfg, block=False)["url"]
    body, answers, deadline = Storage().read_bytes(image), [], time.monotonic() + 120
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < deadline and len(answers) < 20:
            try:
                r = client.post(f"{url}/v1/classify", params={"domain": domain}, content=body,
                                headers={"content-type": "image/png"})
            except httpx.HTTPError:
                time.sleep(0.5)
                continue
            if r.status_code == 200:
                answers.append(r.json())
            else:
                time.sleep(0.5)
    return answers


def main(root: str, workdir: str, base_url: str, out: str, image: str, domain: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(**NODE, num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    cluster.connect()
    try:
        from near_ray.config import RunConfig
        from near_ray.pipeline import run_pipeline

        cfg = RunConfig.model_validate(config(root, workdir, base_url))
        summary = run_pipeline(cfg)
        answers = serve_and_ask(cfg, image, domain)
        result = {
            "answers": answers,
            "nodes": {"head": cluster.head_node.node_id, "workers": [w.node_id for w in workers]},
            "actors": actor_nodes(),
            "summary": summary,
        }
        Path(out).write_text(json.dumps(result, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:7])
