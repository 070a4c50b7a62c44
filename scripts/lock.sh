#!/usr/bin/env bash
# Regenerate requirements/lock-cpu.txt from a fresh resolve, then run the test suite against it.
#
# 1. a throw-away venv gets the README's install WITHOUT the lock (LLM2CLIP_LOCK=none), so pip
#    resolves today's newest releases within pyproject.toml's ranges;
# 2. its `pip freeze` (less torch, which TORCH_SPEC pins, and this package) becomes the new lock;
# 3. the suite runs in that venv: a lock is only written back when the tests pass.
# Usage: bash scripts/lock.sh [--no-tests]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
LLM2CLIP_LOCK=none bash scripts/install.sh
new="$work/lock-cpu.txt"
{
  echo "# Exact versions of the whole CPU set, tested together (scripts/lock.sh writes this file)."
  echo "# torch is not here: scripts/install.sh pins it through TORCH_SPEC (CPU by default, CUDA on a GPU machine)."
  echo "# Regenerated $(date -u +%Y-%m-%d) with $(python --version)."
  python -m pip freeze --exclude-editable --all \
    | grep -viE '^(torch|llm2clip-vlm|pip|setuptools|wheel)==' | sort -f
} > "$new"
if [ "${1:-}" != "--no-tests" ]; then
  python -m pytest -q -ra -n 2 --dist loadfile
fi
cp "$new" "$repo/requirements/lock-cpu.txt"
echo "wrote requirements/lock-cpu.txt ($(grep -vc '^#' "$new") packages)"
