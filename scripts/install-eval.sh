#!/usr/bin/env bash
# Install lmms-eval (for `llm2clip-vlm eval`) into the active environment WITHOUT touching torch.
#
# lmms-eval's metadata requires torchvision, timm, wandb, openai, opencv, av, ... for its ~100
# other models and tasks. On a CPU-only machine the resolver then installs a torchvision built
# for CUDA torch (or replaces torch itself), which breaks `import torchvision` and with it
# transformers' image code and peft. So lmms-eval goes in with --no-deps, followed by the few
# packages its core (registry, task loading, evaluator, CLI) and our three tasks (mme,
# scienceqa_img, vizwiz_vqa_val) import, with torch pinned to the installed build.
set -euo pipefail
cd "$(dirname "$0")/.."
LMMS_EVAL_SPEC="${LMMS_EVAL_SPEC:-lmms-eval==0.7.3}"
# filelock 4.3.1 removed filelock._api, which lmms-eval 0.7.3's evaluator imports.
EVAL_DEPS=(loguru sacrebleu "evaluate>=0.4" "tenacity>=8.3" pytz pytablewriter jsonlines "filelock<4.3.1")
LOCK="${LLM2CLIP_LOCK:-requirements/lock-cpu.txt}"

torch_before=$(python -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# Pin the installed torch: nothing below may replace it.
echo "torch==${torch_before}" > "$constraints"
# ...and every other package stays at its locked version.
if [ "$LOCK" != "none" ]; then grep -v '^torch==' "$LOCK" >> "$constraints"; fi

# Dependencies first, so pip does not list lmms-eval's unmet ones as "conflicts" while installing them.
python -m pip install -q -c "$constraints" "${EVAL_DEPS[@]}"
python -m pip install -q -c "$constraints" --no-deps "$LMMS_EVAL_SPEC"
# Re-register our entry points (lmms_eval.models) in case the package was installed before them.
python -m pip install -q --no-deps -e .

python - "$torch_before" <<'PY'
import importlib.util, sys
from llm2clip_vlm.noise import quiet_third_party
quiet_third_party()  # the commands' own filters: bitsandbytes' optional-kernel notice on import
import torch, transformers, peft
from transformers import CLIPImageProcessor
assert torch.__version__ == sys.argv[1], f"torch changed: {sys.argv[1]} -> {torch.__version__}"
from lmms_eval.models import get_model
import lmms_eval.evaluator  # noqa: F401
get_model("llm2clip_llava")
tv = "absent" if importlib.util.find_spec("torchvision") is None else "present"
print(f"lmms-eval ok | torch {torch.__version__} | transformers {transformers.__version__} | peft {peft.__version__} | torchvision {tv}")
PY
