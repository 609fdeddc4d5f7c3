# Two commands do all set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch (the [train] extra) goes in first, from this spec: on our machines torch==2.13.0 is a local CPU wheel,
# while an unpinned torch would pull several GB of CUDA wheels. Override it elsewhere.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean optimum-graphs

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,serve,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) samples/demo.py

# Optimum's BART, T5 and LLaMA-with-past exports (tests/test_optimum_multi_file.py, tests/test_per_row_optimum.py),
# made in a side venv (.venv-optimum):
# optimum-onnx pins transformers < 4.58. Quick once made: each model is skipped when complete.
optimum-graphs:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" sh tests/side/optimum_export.sh tests/.optimum-graphs

test: $(STAMP) optimum-graphs
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check lora_export plugins tests samples benchmarks
	$(VENV)/bin/ruff format --check lora_export plugins tests samples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/cli_start.py
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/adapters.py

clean:
	rm -rf $(VENV) .venv-optimum tests/.optimum-graphs samples/out
