#!/usr/bin/env bash
# The GPU proof in one command (docs/BENCHMARKS.md, "GPU proof"): every bench suite at reference
# size with random weights, stage 2 fed from JPEG shards, build-tower and llava-pretrain on the
# demo, FSDP2 on one GPU, and the plan against measured peaks; at most 10 minutes on one H100,
# nothing downloaded. Writes OUT/gpu-proof.json and OUT/gpu-proof.md (BENCHMARKS rows).
#
#   bash scripts/gpu-proof.sh [--out DIR] [--dry-run] [--only STEP ...]
#
# --dry-run: the same steps with tiny sizes on the CPU (the test suite runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
exec "$PY" scripts/gpu_proof.py "$@"
