"""Held-out question answering: greedy answers of a LLaVA model, scored by exact match.

Used by ``llava-pretrain`` / ``llava-finetune`` to report accuracy before and after training on
questions whose answers are known (the synthetic world's held-out split, or any LLaVA records
with an ``"answer"`` field). Answers are normalised (case, surrounding punctuation and spaces);
a lettered multiple-choice answer counts when its first letter matches, as ScienceQA scoring does.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.llava.data import LlavaRecord, image_to_pixels
from llm2clip_vlm.llava.templates import TemplateName, generation_prompt, tokenize_image_chunks
from llm2clip_vlm.progress import make_progress


def normalise_answer(text: str) -> str:
    """Lower case, first line only, no surrounding punctuation or spaces."""
    text = text.strip().split("\n")[0]
    return re.sub(r"^[\s\"'.,:;!?]+|[\s\"'.,:;!?]+$", "", text.lower())


def is_correct(prediction: str, answer: str, question_type: str = "") -> bool:
    pred, ans = normalise_answer(prediction), normalise_answer(answer)
    if question_type == "choice" or re.fullmatch(r"[a-d]", ans):
        return pred[:1] == ans[:1] and (len(pred) == 1 or not pred[1:2].isalpha())
    return pred == ans


@torch.no_grad()
def answer_questions(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    records: Sequence[LlavaRecord],
    *,
    template: TemplateName,
    image_token_id: int,
    image_seq_length: int,
    image_aspect_ratio: str = "pad",
    system: str | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers to each record's first question (left-padded batches, request order kept)."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answers: list[str] = []
    with make_progress(disable=not show_progress) as progress:
        task = progress.add_task("answering", total=len(records), status="", unit="question")
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            rows, pixels = [], []
            for rec in chunk:
                question = rec.conversations[0]["value"]
                prompt = generation_prompt(template, question, tokenizer, system, has_image=rec.has_image)
                ids: list[int] = []
                for t in tokenize_image_chunks(prompt, tokenizer)[0]:  # as training tokenized
                    ids += [t] * (image_seq_length if t == image_token_id else 1)
                rows.append(ids)
                if rec.image is not None:
                    pixels.append(
                        image_to_pixels(load_rgb(rec.image, rec.source), image_processor, image_aspect_ratio)
                    )
            t = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), t), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), t), dtype=torch.long)
            for i, r in enumerate(rows):  # left padding: every prompt ends where generation starts
                input_ids[i, t - len(r) :] = torch.tensor(r)
                mask[i, t - len(r) :] = 1
            kwargs: dict[str, Any] = {
                "input_ids": input_ids.to(device),
                "attention_mask": mask.to(device),
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "pad_token_id": pad,
            }
            if stop_ids:
                kwargs["eos_token_id"] = stop_ids
            if pixels:
                kwargs["pixel_values"] = torch.stack(pixels).to(device)
            if autocast is not None:
                with autocast():
                    out = model.generate(**kwargs)
            else:
                out = model.generate(**kwargs)
            for row in out[:, t:]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True))
            progress.advance(task, len(chunk))
    return answers


def score(records: Sequence[LlavaRecord], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy (percent) overall and per ``question_type``, with counts."""
    per_type: dict[str, list[bool]] = defaultdict(list)
    for rec, pred in zip(records, predictions, strict=True):
        answer = str(rec.extra.get("answer", rec.conversations[1]["value"]))
        qtype = str(rec.extra.get("question_type", ""))
        per_type[qtype or "all"].append(is_correct(pred, answer, qtype))
    flat = [c for v in per_type.values() for c in v]
    return {
        "accuracy": 100.0 * sum(flat) / max(1, len(flat)),
        "n": len(flat),
        "per_type": {
            k: {"accuracy": 100.0 * sum(v) / len(v), "n": len(v)} for k, v in sorted(per_type.items())
        },
    }
