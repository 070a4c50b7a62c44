#!/usr/bin/env bash
# The reference comparison of SPEC section 1: LLaVA-1.5-7B with the OpenAI CLIP ViT-L/14-336 tower
# vs with the LLM2CLIP tower, on MME, ScienceQA-IMG and VizWiz through lmms-eval.
#
# Inputs: two LLaVA-1.5-7B models in transformers format (`llm2clip-vlm llava-finetune` output, or
# any LlavaForConditionalGeneration directory with its processor; a `llava_template.json` says
# which conversation template it was trained with, default vicuna_v1). The standard tasks download
# their data sets from the Hugging Face hub (~7 GB: MME 2374 questions, ScienceQA-IMG test 2017,
# VizWiz val 4319); offline, pass --data-dir with parquet copies (docs/DATA.md).
#
# Usage:  GPUS=1 bash recipes/eval-llava15-7b.sh CLIP_MODEL LLM2CLIP_MODEL [OUT [EVAL OPTIONS...]]
#         GPUS=8 bash recipes/eval-llava15-7b.sh CLIP_MODEL LLM2CLIP_MODEL [OUT [EVAL OPTIONS...]]
# EVAL OPTIONS go to `llm2clip-vlm eval` after the ones below (a repeated option wins), e.g.
#   --data-dir DIR (offline parquet copies), --limit N, --dataset-org lmms-lab|lmms-lab-encoder
#   (or per task, mme=lmms-lab,...: where the hub data sets live; lmms-eval moved them after v0.7.2);
#   DEVICE=cpu picks the device of GPUS=1.
# Reference (paper, LLaVA-1.5-7B): MME perception 1476.7 -> 1505.8, SQA-IMG 67.97 -> 69.92,
# VizWiz 50.57 -> 52.37 (test-dev; lmms-eval's vizwiz_vqa_val is val).
set -euo pipefail
CLIP_MODEL=${1:?CLIP-tower LLaVA model directory}
LLM2CLIP_MODEL=${2:?LLM2CLIP-tower LLaVA model directory}
OUT=${3:-runs/eval-llava15-7b}
GPUS=${GPUS:-1}
DEVICE=${DEVICE:-cuda}
TASKS=mme,scienceqa_img,vizwiz_vqa_val
# fp16 like LLaVA-1.5's own evaluation; batch 8 prompts per generate call on an 80 GB GPU.
COMMON=(--tasks "$TASKS" --dtype float16 --batch-size 8 --output "$OUT" "${@:4}")

if [ "$GPUS" = "1" ]; then
  # One process, one GPU: both models in turn, then the table.
  llm2clip-vlm eval "$CLIP_MODEL" "$LLM2CLIP_MODEL" --device "$DEVICE" "${COMMON[@]}"
else
  # Data parallel: one process per GPU, each with a whole model; lmms-eval shards the documents
  # by rank and gathers the scores on rank 0, which writes the results and the table.
  accelerate launch --num_processes "$GPUS" --multi_gpu -m llm2clip_vlm.cli eval \
    "$CLIP_MODEL" "$LLM2CLIP_MODEL" "${COMMON[@]}"
fi

# The same runs with lmms-eval's own CLI (no llm2clip-vlm command involved), then the table:
#   accelerate launch --num_processes 8 -m lmms_eval --model llm2clip_llava \
#     --model_args pretrained=$LLM2CLIP_MODEL,dtype=float16 --tasks $TASKS --batch_size 8 \
#     --log_samples --output_path $OUT/lmms-eval-llm2clip
#   llm2clip-vlm eval --compare $OUT/lmms-eval-clip/*/*_results.json \
#     --compare $OUT/lmms-eval-llm2clip/*/*_results.json -o $OUT/table
