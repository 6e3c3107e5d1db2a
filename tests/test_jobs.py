"""The Ray user's path: the stages as `ray job submit` jobs on a real Ray head, and the cluster files.

One Ray head for the module, started as a user would (`ray start --head` on 127.0.0.1, token
authentication on, the job CLI with RAY_AUTH_MODE=token), in a temporary HOME and temp dir so that
nothing it writes (the token, the "current cluster" file) reaches other runs on the machine, and
stopped by its own process IDs. The run config lives on moto S3 (`-c s3://…`); the MLLM is the
simulated annotator over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, wait_for_port
from support.training import scalars

from near_ray.sim.annotator import AnnotatorServer
from near_ray.storage import Storage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


# ------------------------------------------------------------------------------------------ the head
class RayHead:
    """A `ray start --head --block` process group of our own, driven through Ray's job CLI and REST API."""

    def __init__(self) -> None:
        # Short: Ray's socket paths below the temp dir must stay under the 107-byte limit.
        self.root = Path(tempfile.mkdtemp(prefix="nrj-", dir="/tmp"))
        home = self.root / "home"
        home.mkdir()
        self.env = {**os.environ, "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True, timeout=60)
        self.token = (self.root / "home" / ".ray" / "auth_token").read_text().strip()
        log = open(self.root / "head.log", "wb")
        self.proc = subprocess.Popen(
            [BIN / "ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
             "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--temp-dir", str(self.root / "ray"), "--num-cpus", "4", "--object-store-memory", str(600 * 2**20)],
            env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "head.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.address}/api/jobs/", headers=self.auth, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the Ray head did not answer at {self.address}: {(self.root / 'head.log').read_text()[-3000:]}")

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def processes(self) -> list[int]:
        """Every process of this head: the `ray start` process's descendants (workers rename themselves
        `ray::…`) and whatever names our temp dir (a process whose parent died)."""
        table = _process_table()
        found = {self.proc.pid} if self.proc is not None and self.proc.pid in table else set()
        grew = True
        while grew:
            children = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
            found |= children
            grew = bool(children)
        found |= {pid for pid, (_, cmdline) in table.items() if str(self.root) in cmdline}
        found.discard(os.getpid())
        return sorted(found)

    def stop(self) -> None:
        """SIGTERM to every process of the head (Ray's own graceful stop), SIGKILL to what is left."""
        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            for pid in self.processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while self.processes() and time.monotonic() < deadline:
                if self.proc is not None:
                    self.proc.poll()  # reap our own child
                time.sleep(0.5)
        if self.proc is not None:
            self.proc.poll()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---------------------------------------------------------------------------------- the job CLI
    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, job: str, *args: str) -> str:
        sid = f"{Path(job).stem}-{uuid.uuid4().hex[:8]}"
        r = self.cli("job", "submit", "--address", self.address, "--submission-id", sid, "--no-wait",
                     "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
                     "--", "python", f"jobs/{job}", *args)
        assert r.returncode == 0, r.stdout + r.stderr
        return sid

    def info(self, sid: str) -> dict[str, Any]:
        r = httpx.get(f"{self.address}/api/jobs/{sid}", headers=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, sid: str, timeout: float = 600, until: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info(sid)
            if info["status"] in until:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {sid} still {self.info(sid)['status']} after {timeout} s:\n{self.logs(sid)[-4000:]}")

    def logs(self, sid: str) -> str:
        r = self.cli("job", "logs", "--address", self.address, sid)
        assert r.returncode == 0, r.stderr
        return r.stdout


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process (Linux /proc; zombies count as gone)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        table[int(entry.name)] = (int(fields[1]), cmdline)
    return table


@pytest.fixture(scope="module")
def head(s3_endpoint):
    """Started after the S3 server: jobs inherit the head's AWS_* variables, which point at it."""
    ray_head = RayHead()
    try:
        ray_head.start()
        yield ray_head
    finally:
        ray_head.stop()
        assert not ray_head.processes(), "processes of the test's Ray head outlived it"


# ------------------------------------------------------------------------------------------ the run
@pytest.fixture(scope="module")
def bench(synth_bench):
    """2 domains x 3 species x 4 images (half of them discovery images) on S3, and its annotator."""
    root = synth_bench(images_per_species=4, image_size=64, s3=True, own=True)  # runs write in its bucket
    name = root.split("/")[2]
    # Slow answers (2 in flight, 2.5 s each: 30 s for the 24) keep the labeling going long enough to
    # stop it half-way, however slowly `ray job stop` starts on a loaded machine.
    with AnnotatorServer(root, profile="strong", seed=0, faults={"latency_s": 2.5}) as annotator:
        yield {"bucket": f"s3://{name}", "root": root, "annotator": annotator}


def run_config(bench: dict[str, Any], workdir: str) -> dict[str, Any]:
    root = bench["root"]
    return {
        "storage": {"workdir": workdir},
        "data": {"domains": [
            {"name": d, "uri": f"{root}/images/{d}/train", "meta_class": m, "truth": f"{root}/truth.parquet"}
            for d, m in (("birds", "bird"), ("flowers", "flower"))
        ]},
        # Ray Data builds every request of so small a listing at once: a stop must still ask only
        # what the labeler already sent (its batches in flight), nothing of what waits for it.
        "label": {"samples": 2, "batch_size": 2, "batches_per_actor": 1, "flush_interval_s": 1.0, "listing_chunk": 4,
                  "backend": {"type": "openai", "base_url": bench["annotator"].base_url, "api_key_env": None, "concurrency": 2}},
        "model": {"arch": "near-tiny", "pretrained": "random"},
        "refine": {"k": 3, "merge_encoder": "none"},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 2, "warmup_epochs": 1, "batch_size": 8,
                  "tracking": {"backend": "tensorboard"}},
        "eval": {"methods": ["zero_shot", "naive_prototypes"], "plots": False},
        "serve": {"cpus_per_replica": 0.25, "max_replicas": 1},
    }


def upload_config(bench: dict[str, Any], name: str, cfg: dict[str, Any]) -> str:
    uri = f"{bench['bucket']}/configs/{name}.yaml"
    Storage().write_text(uri, yaml.safe_dump(cfg))
    return uri


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def pipeline_run(head, bench):
    """jobs/pipeline.py, stopped with `ray job stop` half-way through labeling, then resubmitted."""
    annotator = bench["annotator"]
    workdir = f"{bench['bucket']}/run"
    config = upload_config(bench, "run", run_config(bench, workdir))
    annotator.reset_stats()
    first = head.submit("pipeline.py", "-c", config)
    wait_for(lambda: annotator.stats()["requests"] >= 4 or head.info(first)["status"] in TERMINAL, 300,
             "the pipeline job never started labeling")
    assert head.info(first)["status"] == "RUNNING", head.logs(first)[-4000:]
    stop = head.cli("job", "stop", "--address", head.address, first)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    stopped = head.wait(first, timeout=120)
    paid_before_resume = annotator.stats()["requests"]
    labels_after_stop = Storage().read_parquet(f"{workdir}/labels").num_rows
    second = head.submit("pipeline.py", "-c", config)
    finished = head.wait(second, timeout=900)
    return {"workdir": workdir, "config": config, "first": first, "second": second, "stopped": stopped,
            "finished": finished, "paid_before_resume": paid_before_resume, "labels_after_stop": labels_after_stop,
            "first_logs": head.logs(first), "second_logs": head.logs(second)}


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.slow
def test_stopped_pipeline_job_resumes_and_pays_no_answer_twice(pipeline_run, bench):
    r = pipeline_run
    assert r["stopped"]["status"] == "STOPPED"
    assert "job run STOPPED" in r["first_logs"], r["first_logs"][-3000:]
    assert "label: stopping: no new requests" in r["first_logs"]
    # The stop came half-way: answers were on storage, and some images were still to be asked.
    assert 0 < r["labels_after_stop"] < 12 * 2
    assert r["finished"]["status"] == "SUCCEEDED", r["second_logs"][-4000:]
    stats = bench["annotator"].annotator.stats(by_image=True)
    # 12 discovery images x 2 samples, each answered exactly once over both jobs (besides each job's
    # preflight probe, about an image the annotator does not know).
    assert stats["requests"] - stats["outcomes"]["unknown_image"] == 12 * 2 and stats["duplicate_answers"] == 0
    assert sorted(set(stats["by_image"].values())) == [2] and len(stats["by_image"]) == 12
    assert "samples already on storage" in r["second_logs"]


@pytest.mark.slow
def test_pipeline_job_writes_labels_bundle_report_and_training_metrics(pipeline_run):
    st, workdir, logs = Storage(), pipeline_run["workdir"], pipeline_run["second_logs"]
    labels = st.read_parquet(f"{workdir}/labels").to_pandas()
    final = labels.drop_duplicates(["uri", "sample"])
    assert len(final) == 12 * 2 and set(final["status"]) <= {"ok", "unparsable"}  # every answer final
    assert set(final["domain"]) == {"birds", "flowers"}
    assert st.exists(f"{workdir}/bundles/naive_prototypes/model.safetensors")
    assert len(st.read_json(f"{workdir}/bundles/naive_prototypes/vocabulary.json")) >= 2
    report = st.read_json(f"{workdir}/report/report.json")
    assert set(report["methods"]) == {"zero_shot", "naive_prototypes"}
    assert 0.0 <= report["methods"]["naive_prototypes"]["cacc"] <= 1.0
    # TensorBoard event files on S3 carry one loss point per epoch.
    events = [o.uri for o in st.list(f"{workdir}/tensorboard/naive_prototypes") if "tfevents" in o.uri]
    assert events, "no TensorBoard event file written"
    steps = {step for tag, step, _ in scalars(st.read_bytes(events[0])) if tag == "train/loss"}
    assert steps == {0, 1}
    # What the job says about itself: config source, workdir, the validated config, one last line.
    assert f"config {pipeline_run['config']}, workdir {workdir}" in logs
    assert "holds no credentials" in logs and "AWS_SECRET_ACCESS_KEY" not in logs
    last = [line for line in logs.splitlines() if line.split(" ", 1)[-1].startswith("job run ")][-1]
    assert "SUCCEEDED" in last and "naive_prototypes cACC" in last and "bundles naive_prototypes" in last


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("label.nonsense=1", "field 'label.nonsense': Extra inputs are not permitted"),
    ("storage.workdir=s3://no-such-bucket-near-ray/run", "bucket 'no-such-bucket-near-ray' is not usable"),
])
def test_job_with_a_bad_config_fails_with_one_line_naming_it(head, bench, override, expected):
    config = upload_config(bench, "bad", run_config(bench, f"{bench['bucket']}/bad"))
    sid = head.submit("pipeline.py", "-c", config, "--set", override)
    info = head.wait(sid, timeout=300)
    logs = head.logs(sid)
    assert info["status"] == "FAILED", logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("near-ray run: error:")]
    assert len(errors) == 1 and expected in errors[0], logs[-3000:]
    assert "Traceback" not in logs


@pytest.mark.slow
def test_serve_job_deploys_the_bundle_and_exits_leaving_it_serving(head, bench, pipeline_run):
    port = free_port()
    sid = head.submit("serve.py", "-c", pipeline_run["config"], "--set", f"serve.port={port}")
    info = head.wait(sid, timeout=600)
    logs = head.logs(sid)
    assert info["status"] == "SUCCEEDED", logs[-4000:]
    assert "job serve SUCCEEDED" in logs
    vocabulary = {v["name"] for v in Storage().read_json(f"{pipeline_run['workdir']}/bundles/naive_prototypes/vocabulary.json")}
    image = next(o.uri for o in Storage().list(f"{bench['root']}/images/birds/test"))
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/classify", content=Storage().read_bytes(image),
                       headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["name"] in vocabulary
    finally:
        down = subprocess.run([str(BIN / "serve"), "shutdown", "-a", head.address, "-y"], env=head.env, cwd=REPO,
                              capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    wait_for(lambda: not port_open(port), 60, "the Serve app still answers after `serve shutdown`")


def port_open(port: int) -> bool:
    try:
        wait_for_port(port, timeout=0.5)
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------------------------------ cluster files
def test_every_cluster_yaml_parses():
    files = sorted((REPO / "cluster").rglob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        assert isinstance(yaml.safe_load(f.read_text()), dict), f


def test_launcher_yaml_validates_against_rays_schema_and_installs_nothing():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cluster = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert {"gpu_label", "gpu_train"} <= set(gpu)
    assert all(t.get("min_workers", 0) == 0 for t in gpu.values())  # autoscaled from zero
    assert gpu["gpu_label"]["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    # The image holds the dependencies: no node reinstalls vLLM or torch when it starts.
    assert not cluster.get("setup_commands") and not cluster.get("file_mounts")
    assert cluster["docker"]["image"].endswith(f"/near-ray:{package_version()}")
    assert all("ImageId" in t["node_config"] for t in types.values())


def test_stage_accelerator_types_match_the_launcher_gpu_nodes():
    from near_ray.config import load_config

    cfg = load_config(REPO / "configs" / "run.yaml")
    types = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())["available_node_types"]
    assert types["gpu_label"]["resources"].get(f"accelerator_type:{cfg.label.backend.accelerator_type}")
    assert types["gpu_train"]["resources"].get(f"accelerator_type:{cfg.train.accelerator_type}")
    assert cfg.train.num_workers <= types["gpu_train"]["resources"]["GPU"]


def test_containerfile_builds_on_the_pinned_ray_and_installs_the_package():
    text = (REPO / "cluster" / "Containerfile").read_text()
    pinned = next(line.split("==")[1].strip() for line in (REPO / "constraints" / "cpu.txt").read_text().splitlines()
                  if line.startswith("ray=="))
    assert f"ARG RAY_VERSION={pinned}" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-" in text and "-gpu" in text
    install = next(line for line in text.splitlines() if line.strip().startswith("RUN pip install"))
    assert '".[gpu]"' in install and '"ray[data,train,serve]==${RAY_VERSION}"' in install
    assert f'image.version="{package_version()}"' in text


def test_kuberay_manifests_run_the_image_and_the_pipeline_job():
    image = None
    for name in ("raycluster", "rayjob", "rayservice"):
        doc = yaml.safe_load((REPO / "cluster" / "kuberay" / f"{name}.yaml").read_text())
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
        assert len(images) == 1, (name, images)
        assert image in (None, *images), (name, image, images)
        image = images.pop()
    assert image.endswith(f"/near-ray:{package_version()}")
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert "jobs/pipeline.py" in job["entrypoint"] and " -c s3://" in job["entrypoint"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["submitterConfig"]["backoffLimit"] >= 1 and job["activeDeadlineSeconds"] > 0


def test_production_example_config_loads_with_every_field_known():
    from near_ray.config import load_config

    cfg = load_config(REPO / "configs" / "run.yaml")  # unknown fields are errors (extra="forbid")
    assert cfg.storage.workdir.startswith("s3://") and all(d.uri.startswith("s3://") for d in cfg.data.domains)
    assert len(cfg.data.domains) >= 3
    assert cfg.label.backend.type == "vllm" and cfg.label.backend.gpus_per_replica >= 1
    assert (cfg.model.arch, cfg.model.pretrained) == ("ViT-B-16-quickgelu", "openai")
    assert cfg.train.use_gpu and cfg.train.tracking.backend in ("tensorboard", "mlflow")


def test_config_is_read_from_s3_and_errors_name_the_file(bucket):
    from near_ray.config import ConfigError, load_config

    uri = f"{bucket}/configs/run.yaml"
    Storage().write_text(uri, yaml.safe_dump({"storage": {"workdir": f"{bucket}/run"}, "train": {"epochs": 3}}))
    assert load_config(uri, ["train.lr=0.001"]).train.epochs == 3
    Storage().write_text(uri, yaml.safe_dump({"train": {"epochz": 3}}))
    with pytest.raises(ConfigError, match=rf"{uri}: field 'train.epochz'"):
        load_config(uri)
    with pytest.raises(ConfigError, match=rf"{bucket}/configs/none.yaml: no such object"):
        load_config(f"{bucket}/configs/none.yaml")
    with pytest.raises(ConfigError, match="s3://no-such-bucket-near-ray/run.yaml: the bucket does not exist"):
        load_config("s3://no-such-bucket-near-ray/run.yaml")


def package_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_sigterm_winds_down_a_stoppable_stage_and_interrupts_anything_else():
    from near_ray.job import stop_gracefully
    from near_ray.stopping import stoppable

    def sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs in this (the main) thread

    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_gracefully()
        with stoppable() as stop:
            sigterm()
            assert stop.requested  # the stage was asked, nothing was interrupted
            with pytest.raises(KeyboardInterrupt):
                sigterm()  # a second signal does not wait
        with pytest.raises(KeyboardInterrupt):
            sigterm()  # no stage that winds down: stop like Ctrl-C
    finally:
        signal.signal(signal.SIGTERM, previous)
