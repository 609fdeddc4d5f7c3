#!/bin/sh
# Export tiny BART, T5 and a decoder-only LLaMA with Optimum into tests/.optimum-graphs/ (tests/test_optimum_multi_file.py,
# tests/test_per_row_optimum.py).
# Optimum (optimum-onnx) pins transformers < 4.58, so it gets its own venv, .venv-optimum (gitignored).
# Idempotent: the venv is kept once installed (stamp file) and each model is skipped once exported (COMPLETE).
set -eu
PYTHON="${PYTHON:-python3}"
VENV="${OPTIMUM_VENV:-.venv-optimum}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
OUT="${1:-tests/.optimum-graphs}"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q "optimum-onnx[onnxruntime]==0.1.0" "transformers>=4.36,<4.58" onnx
    touch "$STAMP"
fi
"$VENV/bin/python" tests/side/optimum_export.py "$OUT"
