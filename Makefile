# Set-up and entry points. `make demo` and `make test` each create .venv when missing,
# install torch (2.13.0 CPU when no torch is importable), build the extension and run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MAX_JOBS ?= 2

SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cpp) setup.py pyproject.toml

.PHONY: install test demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.deps: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --quiet setuptools wheel ninja
	$(PY) -m pip install --quiet safetensors "pydantic>=2" numpy pyyaml pytest pytest-benchmark \
		hypothesis transformers peft matplotlib rich ruff \
		gymnasium minigrid
	touch $@

# The extension is rebuilt whenever a C++ source or the build files change.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import lora_runtime as L, sys; ok = L.extension_loaded(); \
		print('lora_runtime.ops._C loaded:', ok); sys.exit(0 if ok else 1)"
	touch $@

install: $(VENV)/.built

test: install
	$(PY) -m pytest tests -q

demo: install
	$(BIN)/lora-runtime demo

bench: install
	$(BIN)/lora-runtime bench

lint: install
	$(PY) -m ruff check lora_runtime tests bench

clean:
	rm -rf build *.egg-info lora_runtime/ops/_C*.so
