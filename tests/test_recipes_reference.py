"""Every reference recipe against a table transcribed from the reference's own files.

Each row names a resolved setting, the reference's value and the file (repository, path, line) it
was read from: microsoft/LLM2CLIP at cba3b45 (``L2C``), McGill-NLP/llm2vec at 312adcf
(``L2V``), haotian-liu/LLaVA at c121f04 (``LLAVA``), and the HF Trainer's defaults
(transformers ``TrainingArguments``) where a reference script sets nothing. Where a recipe
departs on purpose the row holds our value and says why; rows with no setting here (``key``
None) record a departure of the pipeline itself. The README's list of departures is this table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm2clip_vlm import config_io
from llm2clip_vlm.recipe import RunConfig

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SAME = object()

L2C_MNTP = "L2C llm_caption_contrastive/train_configs/mntp/MetaLlama3_cc3m.json"
L2C_SUP = "L2C llm_caption_contrastive/train_configs/supervised/MetaLlama3_cc3m.json"
L2C_E5 = "L2C llm_caption_contrastive/dataset/E5_cc3m.py"
L2C_RUN_SUP = "L2C llm_caption_contrastive/run_supervised.py"
L2C_RUN_MNTP = "L2C llm_caption_contrastive/run_mntp.py"
L2C_README = "L2C llm_caption_contrastive/README.md:13 ('8*80g h100')"
HF = "transformers TrainingArguments default"
RUN_SH = "L2C llm2clip/run.sh"
PARAMS = "L2C llm2clip/training/params.py"
CFG = "L2C llm2clip/eva_clip/model_configs/"
LLAVA_PRE = "LLAVA scripts/v1_5/pretrain.sh"
LLAVA_FT = "LLAVA scripts/v1_5/finetune.sh"
LLAVA_LORA = "LLAVA scripts/v1_5/finetune_lora.sh"
LLAVA_TRAIN = "LLAVA llava/train/train.py"


@dataclass(frozen=True)
class Row:
    key: str | None  # dotted path in the resolved RunConfig (None: not a setting here)
    reference: Any
    source: str
    ours: Any = SAME  # our value where the recipe departs on purpose
    why: str = ""


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


WIKITEXT_WHY = (
    "the reference loads wikitext-103-raw-v1 from the hub; offline we read its wiki.train.raw, "
    "one line a sample"
)
# -- stage 1 -----------------------------------------------------------------------------------
STAGE1_COMMON = [
    Row("stage1.max_length", 512, f"{L2C_SUP}:20 max_seq_length; {L2C_MNTP}:16"),
    Row("stage1.lr", 2e-4, f"{L2C_SUP}:12 learning_rate"),
    Row("stage1.loop.epochs", 1.0, f"{L2C_SUP}:13 num_train_epochs"),
    Row("stage1.loop.warmup_steps", 300, f"{L2C_SUP}:14 warmup_steps"),
    Row("stage1.loop.warmup_from_zero", True, f"{HF}: get_linear_schedule_with_warmup, lr 0 at step 0"),
    Row("stage1.loop.schedule", "linear", f"{HF}: lr_scheduler_type 'linear'"),
    Row("stage1.loop.grad_clip", 1.0, f"{HF}: max_grad_norm 1.0"),
    Row("stage1.weight_decay", 0.0, f"{HF}: weight_decay 0.0"),
    Row("stage1.batch_size", 512, f"{L2C_SUP}:15 per_device_train_batch_size 64 x {L2C_README}"),
    Row("stage1.gradient_checkpointing", True, f"{L2C_SUP}:27"),
    Row("stage1.loop.precision", "bf16", f"{L2C_SUP}:28 torch_dtype bfloat16, :32 bf16"),
    Row("stage1.seed", 42, f"{L2C_SUP}:30"),
    Row("stage1.pooling", "mean", f"{L2C_SUP}:8 pooling_mode"),
    Row("stage1.lora.r", 16, f"{L2C_SUP}:26 lora_r; {L2C_MNTP}:25"),
    Row("stage1.lora.alpha", 32, f"{L2C_RUN_SUP}:466 lora_alpha=2*lora_r; {L2C_RUN_MNTP}:733"),
    Row("stage1.lora.dropout", 0.05, f"{L2C_RUN_SUP}:225 CustomArguments.lora_dropout"),
    Row(
        "stage1.lora.target_modules",
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        f"{L2C_RUN_SUP}:97-105 initialize_peft (Llama)",
    ),  # fmt: skip
    Row("stage1.scale", 50.0, f"{L2C_RUN_SUP}:245 CustomArguments.loss_scale"),
    Row("stage1.hard_negatives", True, f"{L2C_E5}:83-96 (one negative per query)"),
    Row("stage1.e5.path", "cache/echo-data", f"{L2C_SUP}:10 dataset_file_path"),
    Row("stage1.e5.tasks", [], f"{L2C_E5}:10-35 E5_EMBEDDING_PROMPTS (every task; [] = all)"),
    Row(
        "stage1.instruction_short_query",
        "Given a sentence, retrieve a detailed relevant sentence",
        f"{L2C_E5}:31-34 E5_EMBEDDING_PROMPTS['cc3m'][0]",
    ),  # fmt: skip
    Row(
        "stage1.instruction_long_query",
        "Given a detailed sentence, retrieve a short relevant sentence",
        f"{L2C_E5}:31-34 E5_EMBEDDING_PROMPTS['cc3m'][1]",
    ),  # fmt: skip
    Row("stage1.caption_template", "auto", f"{L2C_RUN_SUP}:50-55 prepare_for_tokenization (Llama-3 header)"),
    Row(
        "data.train.caption_columns",
        {"short_caption": "short", "long_caption": "long"},
        f"{L2C_E5}:63",
        ours={"shortSV_captions": "short", "longSV_captions": "long"},
        why="cc3m_SnL.csv is not released; the DreamLIP sub-captions are what stage 2 embeds "
        "(llm2clip/data/extract_embedding.py:12); with several per kind one is drawn per image",
    ),  # fmt: skip
    Row(
        "stage1.attn_implementation",
        "flash_attention_2",
        f"{L2C_SUP}:29",
        ours="sdpa",
        why="flash-attn is an optional CUDA build; sdpa computes the same attention",
    ),  # fmt: skip
    Row(
        None,
        "order of E5Data (python random after set_seed)",
        f"{L2C_E5}:99-199",
        ours="the same order (random.Random(seed) replays it; tests/test_e5_batches.py)",
        why="same",
    ),
    Row(
        None,
        "StopTrainingCallback after 10000 steps",
        f"{L2C_RUN_SUP}:231 stop_after_n_steps",
        ours="no step cap",
        why="one epoch of E5 + CC3M at 512 is below 10000 steps; the cap is never hit",
    ),
]
STAGE1 = STAGE1_COMMON + [
    Row("stage1.model", "meta-llama/Meta-Llama-3-8B-Instruct", f"{L2C_MNTP}:2 model_name_or_path"),
    Row(
        "stage1.adapters",
        [
            "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp",
            "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised",
        ],
        f"{L2C_MNTP}:4-7 extra_model_name_or_path; {L2C_SUP}:2-6 starts from the same two + step 1",
    ),  # fmt: skip
    Row("stage1.mntp.enabled", True, f"{L2C_README}: MNTP, then supervised"),
    Row("stage1.mntp.mlm_probability", 0.2, f"{L2C_MNTP}:19"),
    Row("stage1.mntp.batch_size", 256, f"{L2C_MNTP}:11 per_device_train_batch_size 32 x 8 GPUs"),
    Row("stage1.mntp.lr", 5e-5, f"{HF}: learning_rate 5e-5 ({L2C_MNTP} sets none)"),
    Row("stage1.mntp.loop.warmup_steps", 0, f"{HF}: warmup_steps 0"),
    Row("stage1.mntp.weight_decay", 0.0, f"{HF}: weight_decay 0.0"),
    Row("stage1.mntp.loop.grad_clip", 1.0, f"{HF}: max_grad_norm 1.0"),
    Row("stage1.mntp.loop.schedule", "linear", f"{HF}: lr_scheduler_type 'linear'"),
    Row(
        "stage1.mntp.loop.max_steps",
        "1 epoch of 512-token blocks",
        f"{L2C_MNTP}:8 num_train_epochs; {L2C_RUN_MNTP}:833-870 group_texts",
        ours=1000,
        why="our MNTP samples lines (wikitext lines, captions) for a step count; the "
        "reference's epoch length depends on the tokenized corpus",
    ),  # fmt: skip
    Row(
        "data.text_corpus",
        ["wikitext-103-raw-v1 (hub)"],
        f"{L2C_MNTP}:9-10 dataset_name/config",
        ours=["data/wikitext-103-raw/wiki.train.raw"],
        why=WIKITEXT_WHY,
    ),  # fmt: skip
    Row(
        "data.text_corpus_ratio",
        "wikitext train + one caption per CC3M image, concatenated",
        "L2C llm_caption_contrastive/dataset/Wiki1M_cc3m.py:60-67 merge_cc3m_wikiraw103",
        ours=0.5,
        why="a sampling share instead of the two corpora's sizes: the reference's token "
        "shares follow from the corpus sizes, which a recipe cannot know",
    ),  # fmt: skip
]
STAGE1_QLORA = STAGE1_COMMON + [
    Row(
        "stage1.model",
        "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp + -supervised + step 1's adapter",
        f"{L2C_SUP}:2-6",
        ours="checkpoints/llm2vec-llama3-8b",
        why="import-encoder's merge of the base + LLM2Vec's two adapters; no MNTP step (a 4-bit base "
        "takes no MNTP nor adapter merge): run stage1-llama3-8b.yaml's MNTP step elsewhere for it",
    ),  # fmt: skip
    Row("stage1.mntp.enabled", True, L2C_README, ours=False, why="as the row above"),
    Row(
        "stage1.lora.quantization",
        "none",
        f"{L2C_SUP}:28 bf16 base",
        ours="4bit",
        why="QLoRA, so the 8B base fits one 24 GB GPU; the merge is into a bf16 reload",
    ),  # fmt: skip
]

# -- stage 2 -----------------------------------------------------------------------------------
STAGE2_COMMON = [
    Row("stage2.batch_size", 4096, f"{RUN_SH}:20 --batch-size=512 x 8 GPUs (:3 nproc_per_node)"),
    Row("stage2.lr", 1e-5, f"{RUN_SH}:24-26 --lr/--visual-lr/--text-lr"),
    Row("stage2.weight_decay", 0.05, f"{RUN_SH}:27-29 --wd/--visual-wd/--text-wd"),
    Row("stage2.layer_decay", 0.85, f"{RUN_SH}:32 --visual-ld (:31 text-ld 1.01: none)"),
    Row("stage2.loop.grad_clip", 5.0, f"{RUN_SH}:33 --grad-clip-norm"),
    Row("stage2.loop.warmup_steps", 0, f"{RUN_SH}:19 --warmup 0"),
    Row("stage2.loop.epochs", 20.0, f"{RUN_SH}:23 --epochs=20"),
    Row("stage2.loop.schedule", "cosine", "L2C llm2clip/training/main.py:28,298-305 warmup_cosine_lr"),
    Row("stage2.seed", 4096, f"{RUN_SH}:37 --seed"),
    Row(
        "stage2.betas", [0.9, 0.999], f"{PARAMS}:4-10,549-552 get_default_params (no 'vit' in the model name)"
    ),
    Row("stage2.eps", 1e-8, f"{PARAMS}:4-10,549-552"),
    Row("stage2.random_resized_crop", [0.9, 1.0], "L2C llm2clip/eva_clip/transform.py:83"),
    Row("stage2.long_caption_ratio", 0.5, "L2C llm2clip/training/data.py:617 random.choice([short, long])"),
    Row("stage2.gradient_checkpointing", True, f"{RUN_SH}:6 --grad-checkpointing"),
    Row(
        "stage2.loop.precision",
        "fp16",
        f"{RUN_SH}:18 --precision fp16",
        ours="bf16",
        why="same speed on A100/H100 without loss scaling; loop.precision=fp16 runs fp16 with a "
        "GradScaler (the reference: DeepSpeed's dynamic scaler, initial 2**16)",
    ),  # fmt: skip
    Row(
        None,
        "--dataset-resampled: 12.87M samples drawn with replacement per epoch",
        f"{RUN_SH}:14,17",
        ours="each epoch a permutation of the records",
        why="same expected exposure per epoch; a "
        "permutation makes the global batch of a step a function of (seed, step), so resume is exact",
    ),  # fmt: skip
    # data.train is the list [data/cc3m, data/cc12m] (two img2dataset folders, keys namespaced).
    Row(None, "--train-data-list CC3M + CC12M", f"{RUN_SH}:13-14"),
    Row(
        None,
        "DeepSpeed ZeRO-1 (--zero-stage=1)",
        f"{RUN_SH}:42",
        ours="DDP or FSDP (recipes/accelerate)",
        why="ZeRO-1 shards only optimizer state; DDP computes the same update",
    ),  # fmt: skip
]
STAGE2 = {
    "stage2-openai-clip-vit-l-14-336.yaml": STAGE2_COMMON
    + [
        Row("stage2.embed_dim", 1280, f"{CFG}OpenaiCLIP-L-14-336.json:2"),
        Row(
            "stage2.backbone.name_or_path",
            "openai/clip-vit-large-patch14-336",
            f"{CFG}OpenaiCLIP-L-14-336.json:4 (336 px)",
        ),
        Row(
            "stage2.image_head",
            "linear",
            "L2C llm2clip/eva_clip/transformer.py:565 VisionTransformer.proj (no bias)",
        ),
        Row("stage2.loss", "clip", f"{RUN_SH}:38-39 --gather-with-grad --local-loss"),
        Row("stage2.logit_scale_init", math.log(1 / 0.07), "L2C llm2clip/eva_clip/model.py:276"),
    ],
    "stage2-eva02-l-14-336.yaml": STAGE2_COMMON
    + [
        Row("stage2.embed_dim", 1280, f"{CFG}EVA02-CLIP-L-14-336.json:2"),
        Row(
            "stage2.backbone.name_or_path",
            "EVA02-CLIP-L-14-336 (eva_clip weights)",
            f"{RUN_SH}:1-2",
            ours="eva02_large_patch14_clip_336.merged2b",
            why="the same EVA02-CLIP-L/14-336 tower as timm ships it",
        ),
        Row(
            "stage2.image_head",
            "linear_bias",
            "L2C llm2clip/eva_clip/eva_vit_model.py:431 nn.Linear(embed_dim, num_classes)",
        ),
        Row("stage2.loss", "clip", f"{RUN_SH}:38-39 --gather-with-grad --local-loss"),
    ],
    "stage2-siglip2-so400m.yaml": STAGE2_COMMON
    + [
        Row("stage2.embed_dim", 1152, f"{CFG}Llama3.1-8B-Siglip2-So-L-14-224.json:2"),
        Row(
            "stage2.backbone.name_or_path",
            "vit_so400m_patch14_siglip_224.v2_webli (timm, 224 px)",
            f"{CFG}Llama3.1-8B-Siglip2-So-L-14-224.json:4,8",
            ours="google/siglip2-so400m-patch14-224",
            why="the same weights in transformers' format (SiglipVisionModel; its pooled output is the MAP head)",
        ),
        Row(
            "stage2.image_head",
            "none",
            f"{CFG}Llama3.1-8B-Siglip2-So-L-14-224.json:6-7 timm_pool map, timm_proj none",
        ),
        Row(
            "stage2.loss",
            "clip (the repo's trainer has no sigmoid loss)",
            f"{RUN_SH}:38-39",
            ours="siglip",
            why="the released LLM2CLIP-Llama3.1-8B-siglip2 tower is described as trained with SigLIP's "
            "sigmoid loss (issue #24); not confirmable from the repo",
        ),  # fmt: skip
        Row(
            "stage2.logit_scale_init",
            math.log(1 / 0.07),
            "L2C llm2clip/eva_clip/model.py:276",
            ours=pytest.approx(math.log(10), abs=1e-6),
            why="the sigmoid loss's own start (SigLIP: scale 10, bias -10)",
        ),
    ],
}

# -- LLaVA -------------------------------------------------------------------------------------
LLAVA_COMMON = [
    Row("llava.vision_feature_layer", -2, f"{LLAVA_PRE}:12 --mm_vision_select_layer -2"),
    Row("llava.select_strategy", "default", f"{LLAVA_TRAIN}:66 mm_vision_select_feature 'patch'"),
    Row("llava.pretrain.template", "plain", f"{LLAVA_PRE}:6 --version plain"),
    Row("llava.pretrain.tune", "projector", f"{LLAVA_PRE}:11 --tune_mm_mlp_adapter True"),
    Row("llava.pretrain.batch_size", 256, f"{LLAVA_PRE}:18,20 per_device 32 x 8 GPUs x accumulation 1"),
    Row("llava.pretrain.micro_batch_size", 32, f"{LLAVA_PRE}:18"),
    Row("llava.pretrain.lr", 1e-3, f"{LLAVA_PRE}:25"),
    Row("llava.pretrain.weight_decay", 0.0, f"{LLAVA_PRE}:26"),
    Row("llava.pretrain.loop.warmup_ratio", 0.03, f"{LLAVA_PRE}:27"),
    Row("llava.pretrain.loop.warmup_from_zero", True, f"{HF}: get_cosine_schedule_with_warmup"),
    Row("llava.pretrain.loop.schedule", "cosine", f"{LLAVA_PRE}:28"),
    Row("llava.pretrain.loop.epochs", 1.0, f"{LLAVA_PRE}:17"),
    Row("llava.pretrain.max_length", 2048, f"{LLAVA_PRE}:31 --model_max_length"),
    Row("llava.pretrain.gradient_checkpointing", True, f"{LLAVA_PRE}:32"),
    Row("llava.pretrain.loop.precision", "bf16", f"{LLAVA_PRE}:15 --bf16 True"),
    Row("llava.pretrain.image_aspect_ratio", "square", f"{LLAVA_TRAIN}:76 default (pretrain.sh sets none)"),
    Row("llava.pretrain.group_by_modality", False, f"{LLAVA_PRE} (no --group_by_modality_length)"),
    Row("llava.pretrain.loss_mean", "micro_batch", f"{HF}: the model's per-batch mean, / accumulation"),
    Row("llava.finetune.template", "vicuna_v1", f"{LLAVA_FT}:6 --version v1"),
    Row("llava.finetune.image_aspect_ratio", "pad", f"{LLAVA_FT}:15"),
    Row("llava.finetune.group_by_modality", True, f"{LLAVA_FT}:16 --group_by_modality_length True"),
    Row(
        "llava.finetune.group_by_length",
        True,
        f"{LLAVA_FT}:16 (LengthGroupedSampler, llava_trainer.py:97-124)",
    ),
    Row("llava.finetune.loss_mean", "micro_batch", f"{HF}: the model's per-batch mean, / accumulation"),
    Row("llava.finetune.weight_decay", 0.0, f"{LLAVA_FT}:28"),
    Row("llava.finetune.loop.warmup_ratio", 0.03, f"{LLAVA_FT}:29"),
    Row("llava.finetune.loop.warmup_from_zero", True, f"{HF}: get_cosine_schedule_with_warmup"),
    Row("llava.finetune.loop.schedule", "cosine", f"{LLAVA_FT}:30"),
    Row("llava.finetune.loop.epochs", 1.0, f"{LLAVA_FT}:19"),
    Row("llava.finetune.max_length", 2048, f"{LLAVA_FT}:33"),
    Row("llava.finetune.micro_batch_size", 16, f"{LLAVA_FT}:20"),
    Row("llava.finetune.batch_size", 128, f"{LLAVA_FT}:20 per_device 16 x 8 GPUs"),
    Row("llava.finetune.gradient_checkpointing", True, f"{LLAVA_FT}:34"),
    Row(
        "llava.llm",
        "lmsys/vicuna-13b-v1.5",
        f"{LLAVA_PRE}:5 (the v1_5 scripts are the 13B's)",
        ours="checkpoints/vicuna-7b-v1.5",
        why="the LLM2CLIP paper's table is LLaVA-1.5-7B (lmsys/vicuna-7b-v1.5, "
        "downloaded once); the 7B runs the same scripts with the 7B LLM",
    ),  # fmt: skip
    Row(
        None,
        "DeepSpeed ZeRO-2 (pretrain) / ZeRO-3 (finetune), tf32",
        f"{LLAVA_PRE}:4,30; {LLAVA_FT}:4",
        ours="recipes/accelerate/llava-deepspeed-zero3-8gpu.yaml for both phases",
        why="ZeRO-3 only changes where state lives; the update is the same",
    ),  # fmt: skip
]
LLAVA_FULL = LLAVA_COMMON + [
    Row("llava.finetune.tune", "full", f"{LLAVA_FT} (no --lora_enable)"),
    Row("llava.finetune.lr", 2e-5, f"{LLAVA_FT}:28"),
]
LLAVA_LORA = [r for r in LLAVA_COMMON if not (r.key or "").startswith("llava.pretrain")] + [
    Row("llava.finetune.tune", "lora", f"{LLAVA_LORA}:4 --lora_enable True"),
    Row("llava.finetune.lora_r", 128, f"{LLAVA_LORA}:4"),
    Row("llava.finetune.lora_alpha", 256, f"{LLAVA_LORA}:4"),
    Row("llava.finetune.lora_dropout", 0.05, f"{LLAVA_TRAIN}:108 TrainingArguments.lora_dropout"),
    Row("llava.finetune.projector_lr", 2e-5, f"{LLAVA_LORA}:4 --mm_projector_lr"),
    Row("llava.finetune.lr", 2e-4, f"{LLAVA_LORA}:28"),
]

TABLE: dict[str, list[Row]] = {
    "stage1-llama3-8b.yaml": STAGE1,
    "stage1-llama3-8b-qlora.yaml": STAGE1_QLORA,
    **STAGE2,
    "llava15-7b-llm2clip.yaml": LLAVA_FULL,
    "llava15-7b-clip-vit-l-14-336.yaml": LLAVA_FULL,
    "llava15-7b-llm2clip-released.yaml": LLAVA_FULL,
    "llava15-7b-llm2clip-lora.yaml": LLAVA_LORA,
    # LLaVA-1.5 on the released SigLIP2 tower: no CLS token, so every patch token is kept.
    "llava15-7b-llm2clip-siglip2-so400m-224.yaml": [
        Row(
            r.key,
            r.reference,
            r.source,
            "full",
            why="SigLIP has no CLS token: LLaVA's 'patch' "
            "(drop the first token) would drop a real patch; 'full' keeps all 256",
        )
        if r.key == "llava.select_strategy"
        else r
        for r in LLAVA_FULL
    ],  # fmt: skip
}


def test_every_training_recipe_has_a_table() -> None:
    recipes = {p.name for p in RECIPES.glob("*.yaml")}
    assert recipes == set(TABLE), f"recipes without a reference table: {sorted(recipes - set(TABLE))}"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_equals_the_reference_table(name: str) -> None:
    cfg = config_io.load(RunConfig, RECIPES / name)
    for row in TABLE[name]:
        assert row.source, row
        if row.ours is not SAME:
            assert row.why, f"{name}: {row.key} departs without a reason"
        if row.key is None:
            continue
        expected = row.reference if row.ours is SAME else row.ours
        value = _get(cfg, row.key)
        if isinstance(expected, dict):  # the recipe's mapping (config_io merges it into the default's)
            value = {k: v for k, v in value.items() if k in expected}
        assert value == expected, f"{name}: {row.key} ({row.source})"


@pytest.mark.parametrize(
    "name",
    [
        "stage1-llama3-8b.yaml",
        "stage1-llama3-8b-qlora.yaml",
        "stage2-eva02-l-14-336.yaml",
        "stage2-openai-clip-vit-l-14-336.yaml",
        "stage2-siglip2-so400m.yaml",
    ],
)
def test_recipes_read_only_the_sub_captions(name: str) -> None:
    # microsoft/LLM2CLIP llm2clip/data/extract_embedding.py:12: _KEYS = ["shortSV_captions",
    # "longSV_captions"]; raw_caption is never embedded nor paired.
    train = yaml.safe_load((RECIPES / name).read_text())["data"]["train"]
    for entry in train if isinstance(train, list) else [train]:  # one set, or CC3M + CC12M
        assert entry["caption_columns"] == {"shortSV_captions": "short", "longSV_captions": "long"}


def departures() -> list[tuple[str, Row]]:
    """Every (recipe, row) that departs from the reference, for the README's list."""
    return [(name, r) for name, rows in TABLE.items() for r in rows if r.ours is not SAME and r.why != "same"]
