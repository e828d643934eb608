#!/usr/bin/env bash
# The main job: PPO fine-tunes SmolLM2-135M-Instruct toward positive sentiment (VADER), offline, on CPU.
# Extra arguments go to `sb3-textrl train` (see `.venv/bin/sb3-textrl train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
exec .venv/bin/sb3-textrl train "$@"
