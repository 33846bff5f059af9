# Set-up and entry points. `make demo` and `make test` each create .venv when missing,
# install torch==2.13.0 when the venv has none (from pip's configured index: on Linux from
# PyPI that is the CUDA build; TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the
# CPU-only build), build the extension and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MAX_JOBS ?= 2

SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp) setup.py pyproject.toml

.PHONY: install test mutate demo bench lint clean

# The venv's own pip (no upgrade: one network round trip less; any pip >= 21.3 does editable
# installs) installs everything in one resolver run.
$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet setuptools wheel ninja safetensors "pydantic>=2" numpy pyyaml \
		pytest pytest-benchmark pytest-randomly pytest-xdist hypothesis transformers peft matplotlib rich ruff \
		gymnasium minigrid
	touch $@

# The extension is rebuilt whenever a C++ source or the build files change.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import lora_runtime as L, sys; ok = L.extension_loaded(); \
		print('lora_runtime.ops._C loaded:', ok); sys.exit(0 if ok else 1)"
	touch $@

install: $(VENV)/.built

# Random test order (pytest-randomly; `-p randomly` fails when the plugin is missing), on
# TEST_WORKERS processes (pytest-xdist, work stealing; default 2, the CI machine's cores).
# `make test TEST_WORKERS=0 PYTEST_ARGS=--randomly-seed=N` replays one order in one process.
# pytest's exit status 5 (no test ran) fails the target like any other non-zero status.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest tests -q -p randomly -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Mutation testing of the core (see TESTING.md; tens of minutes, not part of `make test`).
# MUTMUT_ARGS picks mutants, e.g. MUTMUT_ARGS='"lora_runtime.rl.grpo.*"'.
# MUTATE_TESTS narrows the test files mutmut runs (the others are deselected), e.g.
# MUTATE_TESTS="tests/adapters/test_targets.py tests/test_actor.py"; empty: pyproject's whole selection.
# MUTATE_KEEP=1 keeps mutants/ (earlier results and stats); by default each run starts afresh.
MUTATE_DESELECT := $(if $(MUTATE_TESTS),$(foreach f,$(filter-out $(MUTATE_TESTS),$(wildcard tests/test_*.py tests/*/test_*.py)),--deselect $(f)))
mutate: install
	$(PY) -m pip install --quiet mutmut
	$(if $(MUTATE_KEEP),,rm -rf mutants)
	PYTEST_ADDOPTS="$(MUTATE_DESELECT)" $(BIN)/mutmut run --max-children 1 $(MUTMUT_ARGS); $(BIN)/mutmut results

demo: install
	$(BIN)/lora-runtime demo

bench: install
	$(BIN)/lora-runtime bench

lint: install
	$(PY) -m ruff check lora_runtime tests bench tools

clean:
	rm -rf build *.egg-info lora_runtime/ops/_C*.so
