#!/usr/bin/env bash
# LLaVA-1.5-7B on a RELEASED LLM2CLIP EVA02 tower, trained by LLaVA's own code:
#   microsoft/LLM2CLIP-EVA02-L-14-336            (EVA02-CLIP-L-14-336 aligned to Llama-3-8B-Instruct CC)
#   microsoft/LLM2CLIP-Llama-3.2-1B-EVA02-L-14-336 (the same tower aligned to Llama-3.2-1B CC)
# import-tower writes the EVA02 tower in timm's format (eva02_large_patch14_clip_336: the key map
# is exact, see llm2clip_vlm/imports/tower_layouts.py). `llm2clip-vlm llava-pretrain` builds a
# transformers LlavaForConditionalGeneration, which takes transformers vision models only, so this
# recipe runs haotian-liu/LLaVA's train_mem.py (LLaVA-1.5's scripts/v1_5/pretrain.sh and
# finetune.sh at c121f04, 7B) with the `llm2clip:` tower through the package's LLaVA shim
# (llm2clip_vlm/adapters/llava): LLM2CLIPVisionTower loads the timm tower, layer -2, CLS dropped,
# 576 patch tokens at 336 px.
#
# Needs: a LLaVA checkout with its environment, timm (pip install 'llm2clip-vlm[timm]'), the parts
# downloaded once (nothing is downloaded at run time), the tower imported (tensors only):
#   huggingface-cli download microsoft/LLM2CLIP-EVA02-L-14-336 --revision refs/pr/5 \
#     --include config.json model.safetensors --local-dir checkpoints/LLM2CLIP-EVA02-L-14-336
# (main holds pickles only; the hub's safetensors conversion is on its refs/pr revisions, docs/DATA.md)
#   llm2clip-vlm import-tower checkpoints/LLM2CLIP-EVA02-L-14-336 -o checkpoints/llm2clip-eva02-l-14-336-imported
#   huggingface-cli download lmsys/vicuna-7b-v1.5 --local-dir checkpoints/vicuna-7b-v1.5
# (the Llama-3.2-1B release the same way; its text side imports with `llm2clip-vlm import-encoder`).
#
# Usage:  LLAVA_DIR=/path/to/LLaVA bash recipes/llava15-7b-llm2clip-eva02-l-14-336.sh \
#           IMPORTED_TOWER_DIR [LLM_DIR [OUT_DIR [DATA_DIR]]]
# DATA_DIR holds LLaVA-Pretrain/ (blip_laion_cc_sbu_558k.json, images/) and LLaVA-1.5's mix665k
# (llava_v1_5_mix665k.json with coco/, gqa/, ocr_vqa/, textvqa/, vg/), as LLaVA's playground/data.
# PHASE=pretrain|finetune|both (default both); DEEPSPEED overrides the launcher command.
# The finetuned model is in LLaVA's format; evaluate it with LLaVA's scripts/v1_5/eval/*.sh run
# through the same shim: python -m llm2clip_vlm.adapters.llava.patch -m llava.eval.model_vqa_loader ...
set -euo pipefail
TOWER=$(cd "${1:?imported tower folder (OUT/tower of import-tower)}" && pwd)
# Absolute paths: the runs happen inside the LLaVA checkout.
LLM=$(realpath -m "${2:-checkpoints/vicuna-7b-v1.5}")
OUT=$(realpath -m "${3:-runs/llava15-eva02}")
DATA=$(realpath -m "${4:-data}")
LLAVA_DIR=${LLAVA_DIR:?a haotian-liu/LLaVA checkout}
PHASE=${PHASE:-both}
read -r -a LAUNCH <<< "${DEEPSPEED:-deepspeed}"
[ -f "$TOWER/config.json" ] || { echo "$TOWER: no config.json (pass OUT/tower of import-tower)" >&2; exit 1; }

# Shared by both phases, as in LLaVA-1.5's scripts (7B: vicuna-7b-v1.5), except --report_to none
# (LLaVA: wandb, which needs a login and the network).
COMMON=(--model_name_or_path "$LLM" --vision_tower "llm2clip:$TOWER" --mm_projector_type mlp2x_gelu
  --mm_vision_select_layer -2 --mm_use_im_start_end False --mm_use_im_patch_token False --bf16 True
  --num_train_epochs 1 --per_device_eval_batch_size 4 --gradient_accumulation_steps 1
  --evaluation_strategy no --save_strategy steps --save_total_limit 1 --weight_decay 0.
  --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1 --tf32 True --model_max_length 2048
  --gradient_checkpointing True --dataloader_num_workers 4 --lazy_preprocess True --report_to none)

cd "$LLAVA_DIR"
if [ "$PHASE" != "finetune" ]; then
  "${LAUNCH[@]}" --module llm2clip_vlm.adapters.llava.patch llava/train/train_mem.py \
    --deepspeed ./scripts/zero2.json --version plain \
    --data_path "$DATA/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json" --image_folder "$DATA/LLaVA-Pretrain/images" \
    --tune_mm_mlp_adapter True --output_dir "$OUT/pretrain" --per_device_train_batch_size 32 \
    --save_steps 24000 --learning_rate 1e-3 "${COMMON[@]}"
fi
if [ "$PHASE" != "pretrain" ]; then
  "${LAUNCH[@]}" --module llm2clip_vlm.adapters.llava.patch llava/train/train_mem.py \
    --deepspeed ./scripts/zero3.json --version v1 \
    --data_path "$DATA/llava_v1_5_mix665k.json" --image_folder "$DATA" \
    --pretrain_mm_mlp_adapter "$OUT/pretrain/mm_projector.bin" --image_aspect_ratio pad \
    --group_by_modality_length True --output_dir "$OUT/finetune" --per_device_train_batch_size 16 \
    --save_steps 50000 --learning_rate 2e-5 "${COMMON[@]}"
fi
