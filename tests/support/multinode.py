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


def lose_a_node(root: str, workdir: str, base_url: str, out: str) -> None:
    """The label stage with a worker node removed mid-run (its raylet and every process on it killed, as a
    machine lost): the node that runs a labeler is removed once a third of the answers are paid. What the
    stage did (finished, or failed and with what message) and what a second run did are written to ``out``."""
    import threading
    import time

    import httpx
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "num_cpus": 1, "include_dashboard": False})
    workers = {w.node_id: w for w in (cluster.add_node(**NODE, num_cpus=2) for _ in range(2))}
    cluster.wait_for_nodes()
    cluster.connect()
    stats_url = base_url.rsplit("/v1", 1)[0] + "/stats"
    try:
        from near_ray.config import RunConfig
        from near_ray.label.stage import run_label

        raw = config(root, workdir, base_url)
        raw["label"].update(actor_cpus=1.0, batch_size=2, flush_interval_s=1.0)
        raw["label"]["backend"].update(concurrency=2)
        cfg = RunConfig.model_validate(raw)
        total = 2 * sum(1 for _ in _images(root))
        runs: list[dict] = []

        def run() -> None:
            t = time.monotonic()
            try:
                summary = run_label(cfg)
                runs.append({"outcome": "finished", "summary": summary})
            except Exception as e:  # what a user would read
                runs.append({"outcome": "failed", "error": f"{type(e).__name__}: {e}"})
            runs[-1]["seconds"] = round(time.monotonic() - t, 1)

        thread = threading.Thread(target=run)
        thread.start()
        while httpx.get(stats_url).json()["answers_paid"] < total // 3 and thread.is_alive():
            time.sleep(0.2)
        alive = [a for a in state.actors().values() if a["State"] == "ALIVE"]
        labelers = {a["Address"]["NodeID"] for a in alive if "OpenAILabeler" in a["ActorClassName"]}
        ledger = {a["Address"]["NodeID"] for a in alive if a["ActorClassName"] == "LedgerPartition"}
        # the worst node to lose: a labeler's and the resume ledger's both, where there is one
        lost = next((n for n in workers if n in labelers and n in ledger), next(n for n in workers if n in labelers))
        paid_at_loss = httpx.get(stats_url).json()["answers_paid"]
        cluster.remove_node(workers[lost], allow_graceful=False)
        thread.join(timeout=900)
        if runs and runs[0]["outcome"] == "failed":
            deadline = time.monotonic() + 120  # resubmitted once the cluster knows the node is gone, as a user
            while time.monotonic() < deadline and any(n["NodeID"] == lost and n["Alive"] for n in ray.nodes()):
                time.sleep(0.5)  # would: nothing new is placed on it then
            run()
        Path(out).write_text(json.dumps({"lost": lost, "labeler_nodes": sorted(labelers), "ledger_nodes": sorted(ledger),
                                         "head": cluster.head_node.node_id, "total": total,
                                         "paid_at_loss": paid_at_loss, "runs": runs}, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


def _images(root: str):
    from near_ray.storage import Storage

    return Storage().list(f"{root}/images")


if __name__ == "__main__":
    if sys.argv[1] == "lose-a-node":
        lose_a_node(*sys.argv[2:6])
    else:
        main(*sys.argv[1:7])
