#!/usr/bin/env bash
# The main job: RLOO (4 completions per prompt) fine-tunes SmolLM2-135M-Instruct toward positive sentiment (VADER),
# offline, on CPU, with a KL penalty to the reference model; `--algo ppo` runs stock PPO instead.
# Extra arguments go to `sb3-textrl train` (see `.venv/bin/sb3-textrl train --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
exec .venv/bin/sb3-textrl train "$@"
