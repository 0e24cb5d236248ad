#!/usr/bin/env bash
# Fetch, here, the pure-Python dependencies the GPU image lacks (the worker's contract and settings
# need pydantic), as x86-64 / CPython 3.12 wheels into .whl (git-ignored). The device run carries
# .whl and bench/gpu_run.sh installs them into /tmp/site. Versions follow this venv's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
pins=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(pydantic|pydantic[-_]core|pydantic[-_]settings|python-dotenv|annotated-types|typing-inspection|typing[-_]extensions)==')
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
ls .whl
