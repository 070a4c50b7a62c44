"""LLaVA-1.5 as its authors trained it, each piece against LLaVA's own code (copies in
tests/reference_llava.py, haotian-liu/LLaVA c121f04) or the HF Trainer's (transformers):
warm-up, ``square`` images for pretraining, ``tokenizer_image_token`` chunks, the per-micro-batch
loss mean, and the length-grouped batches."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference_llava import (
    LengthGroupedSampler,
    modality_lengths,
    preprocess_plain,
    square_or_pad_pixels,
    tokenizer_image_token,
)
from torch import nn
from transformers import AddedToken, CLIPImageProcessor, PreTrainedTokenizerFast

from llm2clip_vlm import config_io
from llm2clip_vlm.llava.config import LlavaConfig
from llm2clip_vlm.llava.data import Collator, Sample, image_to_pixels
from llm2clip_vlm.llava.grouping import LengthGroupedBatchSampler
from llm2clip_vlm.llava.grouping import modality_lengths as our_modality_lengths
from llm2clip_vlm.llava.step import LlavaStep
from llm2clip_vlm.llava.templates import IGNORE_INDEX, tokenize_conversation, tokenize_image_chunks
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.tiny import tiny_tokenizer
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.optim import make_scheduler

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# -- warm-up ---------------------------------------------------------------------------------
@pytest.mark.parametrize("total", [2180, 5198, 7])  # LCS-558K / 256, mix665k / 128, a tiny run
def test_llava_schedule_is_the_hf_trainers(total: int) -> None:
    """The HF Trainer (warmup_ratio 0.03, cosine): ``get_cosine_schedule_with_warmup`` with
    ``ceil(0.03 * steps)`` warm-up steps, from lr 0."""
    from transformers import get_cosine_schedule_with_warmup

    for phase in ("pretrain", "finetune"):
        loop = getattr(LlavaConfig(), phase).loop
        ours = make_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), loop, total)
        ref = get_cosine_schedule_with_warmup(
            torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), math.ceil(0.03 * total), total
        )
        assert [ours.lr_lambdas[0](k) for k in range(total)] == pytest.approx(
            [ref.lr_lambdas[0](k) for k in range(total)], abs=1e-12
        )
    if total == 2180:  # 66 warm-up steps: 0, 1/66, 2/66, ... (ours was one step ahead)
        assert [ours.lr_lambdas[0](k) for k in range(3)] == [0.0, 1 / 66, 2 / 66]


# -- square / pad ----------------------------------------------------------------------------
def test_pretraining_uses_square_images_as_llava() -> None:
    """pretrain.sh passes no --image_aspect_ratio (train.py's default 'square'); finetune.sh pads."""
    cfg = LlavaConfig()
    assert cfg.pretrain.image_aspect_ratio == "square" and cfg.finetune.image_aspect_ratio == "pad"
    for name in ("llava15-7b-llm2clip.yaml", "llava15-7b-clip-vit-l-14-336.yaml"):
        run = config_io.load(RunConfig, RECIPES / name)
        assert run.llava.pretrain.image_aspect_ratio == "square", name
        assert run.llava.finetune.image_aspect_ratio == "pad", name
    proc = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    for ours, theirs in (("square", "square"), ("pad", "pad")):
        assert torch.equal(image_to_pixels(img, proc, ours), square_or_pad_pixels(img, proc, theirs))
    assert not torch.equal(image_to_pixels(img, proc, "square"), image_to_pixels(img, proc, "pad"))


# -- tokenizer_image_token -------------------------------------------------------------------
def _byte_level() -> PreTrainedTokenizerFast:
    t = tiny_tokenizer()
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return t


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama's normalizer (a "▁" in front, spaces as "▁"), with <image> normalized as part of the
    text: then the text after <image> starts with its own "▁" only when tokenized as a chunk, the
    one-token difference LLaVA's chunks make with the real Vicuna tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers

    corpus = [
        "What colour is the circle?",
        "a red circle on the left",
        "Where is it? top left",
        "USER: ASSISTANT:",
    ]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    alphabet = list("▁\n?:.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    tok.train_from_iterator(corpus * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.add_tokens([AddedToken("<image>", special=False, normalized=True)])
    return t


CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "top left"},
]


@pytest.mark.parametrize("make", [_byte_level, _sentencepiece_like])
def test_image_chunks_equal_tokenizer_image_token(make) -> None:
    tok = make()
    image_id = tok.convert_tokens_to_ids("<image>")
    for text in (
        "A chat. USER: <image>\nWhat colour is the circle? ASSISTANT: red</s>",
        "<image>a red circle on the left\n",
        "no image here",
    ):
        ours, offsets = tokenize_image_chunks(text, tok)
        assert ours == tokenizer_image_token(text, tok, image_id), text
        assert len(offsets) == len(ours)
    if make is _sentencepiece_like:  # the copy bites: the whole string tokenizes differently
        text = "USER: <image>\nWhat colour is the circle?"
        assert tokenize_image_chunks(text, tok)[0] != tok(text)["input_ids"]


@pytest.mark.parametrize("make", [_byte_level, _sentencepiece_like])
def test_plain_template_ids_and_labels_equal_preprocess_plain(make) -> None:
    tok = make()
    image_id = tok.convert_tokens_to_ids("<image>")
    ref = preprocess_plain([[dict(t) for t in CONV[:2]]], tok, image_id)
    ours = tokenize_conversation("plain", CONV[:2], tok)
    assert ours.input_ids == ref["input_ids"][0].tolist()
    assert ours.labels == ref["labels"][0].tolist()


# -- per-micro-batch loss mean ---------------------------------------------------------------
class _TinyLM(nn.Module):
    """A causal-LM stand-in with LLaVA's call surface (``logits_to_keep``)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask, logits_to_keep=None, pixel_values=None):
        logits = self.head(self.emb(input_ids))
        return type("Out", (), {"logits": logits if logits_to_keep is None else logits[:, logits_to_keep]})()


def _hf_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss: shift by one, cross-entropy mean over non-ignored labels."""
    logits = model(ids, None).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def test_micro_batch_loss_mean_is_the_hf_trainers() -> None:
    rng = random.Random(0)
    samples = []
    for n in (5, 9, 4, 20):  # micro batches of 8 and 12 supervised tokens: the two means differ
        ids = torch.tensor([rng.randrange(1, 11) for _ in range(n)])
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        samples.append(Sample(ids, labels, None, False, f"r{n}"))
    batch = Collator(0)(samples)
    acc = dist.make_accelerator("fp32")
    losses, grads = {}, {}
    for mean in ("micro_batch", "tokens"):
        model = _TinyLM()
        losses[mean] = LlavaStep(acc, model, 2, False, {}, mean)(batch).loss
        grads[mean] = model.head.weight.grad.clone()
    # LLaVA (HF Trainer, gradient_accumulation_steps 2): each micro batch's mean / 2, summed.
    model = _TinyLM()
    micro = batch.split(2)
    ref = sum(_hf_loss(model, mb.input_ids, mb.labels) for mb in micro) / len(micro)
    ref.backward()
    assert losses["micro_batch"] == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(grads["micro_batch"], model.head.weight.grad, atol=1e-6)
    assert abs(losses["tokens"] - losses["micro_batch"]) > 1e-4  # the other mean, on the same batch


def test_length_sorted_micro_batches_pad_less_than_llavas_grouping_with_the_same_token_mean() -> None:
    """LLaVA's length grouping does not cut the padding inside an optimizer step: its megabatch is
    one step (``world_size`` = processes x gradient_accumulation_steps in ``_get_train_sampler``,
    haotian-liu/LLaVA llava/train/llava_trainer.py) and ``split_to_even_chunks`` deals the
    step's records, longest first, to the chunk of least total length, so every micro batch mixes
    long and short records. Our step sorts its batch by length before cutting the micro batches
    (``sort_micro_batches``); the token-mean loss does not depend on the grouping."""
    rng = random.Random(3)
    lengths = [rng.randint(4, 60) for _ in range(64)]
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.tensor([rng.randrange(1, 11) for _ in range(n)])
        labels = ids.clone()
        labels[: n // 2] = IGNORE_INDEX
        pixels = torch.full((3, 2, 2), float(i)) if i % 2 else None  # odd records carry an "image"
        samples.append(Sample(ids, labels, pixels, False, f"r{i}"))
    micro, accumulation = 4, 4
    torch.manual_seed(0)
    order = list(LengthGroupedSampler(micro, accumulation, lengths=lengths, group_by_modality=False))
    step = Collator(0)([samples[i] for i in order[: micro * accumulation]])  # LLaVA's first step
    computed = {
        "llava": sum(mb.input_ids.numel() for mb in step.split(micro)),
        "sorted": sum(mb.input_ids.numel() for mb in step.by_length().split(micro)),
    }
    real = int(step.attention_mask.sum())
    assert computed["sorted"] < real + 0.5 * (computed["llava"] - real)  # under half the padding
    # Rows keep their image and source: odd records' pixels carry their record number.
    ranked = step.by_length()
    assert ranked.attention_mask.sum(1).tolist() == sorted(step.attention_mask.sum(1).tolist(), reverse=True)
    image_sources = [s for s, has in zip(ranked.sources, ranked.image_rows.tolist(), strict=True) if has]
    assert [f"r{int(pv[0, 0, 0])}" for pv in ranked.pixel_values] == image_sources
    acc = dist.make_accelerator("fp32")
    losses, grads = {}, {}
    for sort in (False, True):
        torch.manual_seed(1)
        model = _TinyLM()
        losses[sort] = LlavaStep(acc, model, micro, False, {}, "tokens", sort_micro_batches=sort)(step).loss
        grads[sort] = model.head.weight.grad.clone()
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert torch.allclose(grads[True], grads[False], atol=1e-7)


def test_a_micro_batch_that_uses_no_trainable_weight_steps_with_zero_gradients() -> None:
    # Projector tuning on text-only rows (sorting by length can put them in one micro batch): the
    # loss does not depend on anything trainable; the step still runs backward, with zeros.
    model = _TinyLM()
    model.requires_grad_(False)
    model.projector = nn.Linear(2, 2)  # trainable, unused by text-only rows
    ids = torch.tensor([1, 2, 3, 4])
    batch = Collator(0)(
        [Sample(ids, ids.clone(), None, False, "t0"), Sample(ids[:3], ids[:3].clone(), None, False, "t1")]
    )
    out = LlavaStep(dist.make_accelerator("fp32"), model, 1, False, {}, "tokens", sort_micro_batches=True)(
        batch
    )
    assert out.loss > 0 and torch.equal(model.projector.weight.grad, torch.zeros(2, 2))


# -- group_by_length -------------------------------------------------------------------------
def _records(n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        rec = {"id": str(i), "conversations": [{"from": "human", "value": " ".join(["w"] * rng.randint(1, 30))},
                                               {"from": "gpt", "value": " ".join(["a"] * rng.randint(1, 60))}]}  # fmt: skip
        if rng.random() < 0.7:
            rec["image"] = f"{i}.jpg"
            rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
        out.append(rec)
    return out


@pytest.mark.parametrize(("world", "micro", "accumulation"), [(1, 4, 2), (2, 3, 1), (2, 2, 3)])
def test_length_grouped_batches_equal_llavas_sampler(world: int, micro: int, accumulation: int) -> None:
    """LLaVA's LengthGroupedSampler (group_by_modality_length) under the HF Trainer: process r's
    micro batch j of step s is per-device batch ``s*W*GA + j*W + r`` of the sampler's order."""
    rng = random.Random(world * 10 + micro)
    records = _records(97, rng)
    lengths = modality_lengths(records)
    words = [sum(len(t["value"].split()) for t in r["conversations"]) for r in records]
    assert our_modality_lengths(words, ["image" in r for r in records]) == lengths
    seed, global_batch = 7, world * micro * accumulation

    torch.manual_seed(seed)  # the HF Trainer's set_seed; LLaVA's sampler draws from torch's generator
    order = list(LengthGroupedSampler(micro, world * accumulation, lengths=lengths, group_by_modality=True))
    device_batches = [order[i : i + micro] for i in range(0, len(order), micro)]
    full_steps = len(records) // global_batch
    for rank in range(world):
        ours = LengthGroupedBatchSampler(lengths, global_batch, micro, rank, world, seed, 0, full_steps)
        for step, local in enumerate(ours):
            expected = [
                i
                for j in range(accumulation)
                for i in device_batches[step * world * accumulation + j * world + rank]
            ]
            assert local == expected, (rank, step)
    # Resumed at step 3: the same batches from there on.
    again = list(LengthGroupedBatchSampler(lengths, global_batch, micro, 0, world, seed, 3, full_steps))
    first = list(LengthGroupedBatchSampler(lengths, global_batch, micro, 0, world, seed, 0, full_steps))
    assert again == first[3:]
