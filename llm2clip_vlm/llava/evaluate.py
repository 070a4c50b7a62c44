"""Held-out question answering: greedy answers of a LLaVA model, scored by exact match.

Used by ``llava-pretrain`` / ``llava-finetune`` to report accuracy before and after training on
questions whose answers are known (the synthetic world's held-out split, or any LLaVA records
with an ``"answer"`` field). Answers are normalised (case, surrounding punctuation and spaces);
a lettered multiple-choice answer counts when its first letter matches, as ScienceQA scoring does.

Every evaluation also asks the questions blind (:mod:`llm2clip_vlm.llava.blind`: by default each
question gets another question's image) and scores the majority answer of each question type, so
a table says per type: accuracy, blind accuracy, the gap (how much the image adds), and what
answering the most frequent answer of that type in the held-out set would score.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llm2clip_vlm.data.conversations import LlavaRecord
from llm2clip_vlm.data.images import load_rgb
from llm2clip_vlm.llava.blind import BlindMode, blank_like, derangement
from llm2clip_vlm.llava.config import LlavaPhaseConfig
from llm2clip_vlm.llava.data import image_to_pixels, mean_colour
from llm2clip_vlm.llava.prompting import generation_ids, left_padded
from llm2clip_vlm.llava.templates import TemplateName
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress

log = get_logger(__name__)


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
    blind: BlindMode = "off",
    blind_seed: int = 0,
) -> list[str]:
    """Greedy answers to each record's first question (left-padded batches, request order kept).

    ``blind``: ``off`` = each question with its own image; ``shuffle`` = with another question's
    image (a seeded derangement of the distinct images); ``blank`` = with a mean-colour image of
    the same size (see :mod:`llm2clip_vlm.llava.blind`). Text-only records are asked as they are.
    """
    model.eval()
    source = {}  # image path -> the image path it is replaced by (shuffle)
    if blind == "shuffle":
        keys = [str(r.image) for r in records if r.image is not None]
        source = derangement(keys, blind_seed) or {}
        if keys and not source:
            raise ValueError("a shuffled blind baseline needs at least two different images; use blank")
    elif blind not in ("off", "blank"):
        raise ValueError(f"blind must be shuffle, blank or off, got {blind!r}")
    by_path = {str(r.image): r for r in records if r.image is not None}
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
                rows.append(
                    generation_ids(
                        template, question, tokenizer, image_token_id, image_seq_length, system, rec.has_image
                    )
                )
                if rec.image is not None:
                    shown = by_path[source[str(rec.image)]] if blind == "shuffle" else rec
                    image = load_rgb(shown.image, shown.source)
                    if blind == "blank":
                        image = blank_like(image, mean_colour(image_processor))
                    pixels.append(image_to_pixels(image, image_processor, image_aspect_ratio))
            input_ids, mask = left_padded(rows, pad)
            t = input_ids.shape[1]
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


def _answer(rec: LlavaRecord) -> str:
    return str(rec.extra.get("answer", rec.conversations[1]["value"]))


def _qtype(rec: LlavaRecord) -> str:
    return str(rec.extra.get("question_type", ""))


def majority_answers(records: Sequence[LlavaRecord]) -> dict[str, str]:
    """The most frequent (normalised) answer of each question type in ``records``.

    Ties go to the answer seen first, so the baseline is deterministic. This is an upper bound on
    what a model that ignores the image *and* the question's wording can score per type.
    """
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        counts[_qtype(rec) or "all"][normalise_answer(_answer(rec))] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def score(
    records: Sequence[LlavaRecord],
    predictions: Sequence[str],
    blind_predictions: Sequence[str] | None = None,
    blind: str = "shuffle",
) -> dict[str, Any]:
    """Accuracy (percent) overall and per ``question_type``, with counts.

    With ``blind_predictions`` (the same questions asked blind, in the same order), each row also
    has ``blind_accuracy`` and ``gap`` (accuracy minus blind accuracy, points). Every row has
    ``majority_accuracy``: the score of always answering the type's most frequent held-out answer
    (``majority_answer``); the overall row sums those per-type policies.
    """
    majority = majority_answers(records)
    sighted: dict[str, list[bool]] = defaultdict(list)
    blinded: dict[str, list[bool]] = defaultdict(list)
    habit: dict[str, list[bool]] = defaultdict(list)
    blind_preds = blind_predictions if blind_predictions is not None else [None] * len(records)
    for rec, pred, bpred in zip(records, predictions, blind_preds, strict=True):
        answer, qtype = _answer(rec), _qtype(rec)
        key = qtype or "all"
        sighted[key].append(is_correct(pred, answer, qtype))
        habit[key].append(is_correct(majority[key], answer, qtype))
        if bpred is not None:
            blinded[key].append(is_correct(bpred, answer, qtype))

    def pct(v: Sequence[bool]) -> float:
        return 100.0 * sum(v) / max(1, len(v))

    def row(s: Sequence[bool], b: Sequence[bool], h: Sequence[bool]) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": pct(s), "n": len(s), "majority_accuracy": pct(h)}
        if blind_predictions is not None:
            out["blind_accuracy"] = pct(b)
            out["gap"] = out["accuracy"] - out["blind_accuracy"]
        return out

    def flat(d: dict[str, list[bool]]) -> list[bool]:
        return [c for v in d.values() for c in v]

    result = row(flat(sighted), flat(blinded), flat(habit))
    if blind_predictions is not None:
        result["blind"] = blind
    result["per_type"] = {
        k: {**row(sighted[k], blinded[k], habit[k]), "majority_answer": majority[k]} for k in sorted(sighted)
    }
    return result


def answer_examples(
    heldout: Sequence[LlavaRecord], preds: Sequence[str], blind_preds: Sequence[str] | None, n: int = 8
) -> list[dict[str, Any]]:
    """The first ``n`` held-out questions with their answers and predictions (``metrics.json``, the
    report's answer gallery)."""
    return [
        {
            "question": r.conversations[0]["value"],
            "answer": r.extra.get("answer"),
            "prediction": pr,
            "question_type": r.extra.get("question_type", ""),
            "image": str(r.image) if r.image else None,
            "correct": is_correct(
                pr,
                str(r.extra.get("answer", r.conversations[1]["value"])),
                str(r.extra.get("question_type", "")),
            ),
            **({"blind_prediction": blind_preds[i]} if blind_preds is not None else {}),
        }
        for i, (r, pr) in enumerate(list(zip(heldout, preds, strict=True))[:n])
    ]


@dataclass(frozen=True)
class HeldoutEvaluation:
    """A phase's held-out evaluation: the questions asked of a model with their images and blind
    (``llava.<phase>.eval_blind``), scored per type, with a few answers for the gallery.

    Attributes:
        questions: the held-out records (each with an ``answer``).
        tokenizer, image_processor: the phase's processor parts.
        phase: ``llava.<phase>`` (template, aspect ratio, generation length, batch, seed, blind mode).
        image_token_id, image_seq_length: the model's image placeholder and its expansion.
        system: the system prompt (None: the template's own).
        device, autocast: where the model runs, and the accelerator's autocast context.
    """

    questions: Sequence[LlavaRecord]
    tokenizer: Any
    image_processor: Any
    phase: LlavaPhaseConfig
    image_token_id: int
    image_seq_length: int
    system: str | None
    device: torch.device | str = "cpu"
    autocast: Any = None

    def __call__(self, model: Any) -> dict[str, Any]:
        """``score``'s table plus ``examples``, for the model as it is now."""
        p, questions = self.phase, self.questions
        preds = self.ask(model, "off")
        # A held-out set with images from fewer than two files cannot be shuffled: blank instead.
        mode = p.eval_blind
        if mode == "shuffle" and len({str(r.image) for r in questions if r.image is not None}) < 2:
            log.warning("held-out images come from one file: the blind baseline uses a blank image")
            mode = "blank"
        blind_preds = self.ask(model, mode) if mode != "off" else None
        result = score(questions, preds, blind_preds, mode)
        result["examples"] = answer_examples(questions, preds, blind_preds)
        return result

    def ask(self, model: Any, blind: BlindMode) -> list[str]:
        """The model's answers, with each question's own image (``off``) or without it."""
        p = self.phase
        return answer_questions(
            model,
            self.tokenizer,
            self.image_processor,
            self.questions,
            template=p.template,
            image_token_id=self.image_token_id,
            image_seq_length=self.image_seq_length,
            image_aspect_ratio=p.image_aspect_ratio,
            system=self.system,
            max_new_tokens=p.eval_max_new_tokens,
            batch_size=p.eval_batch_size,
            device=self.device,
            autocast=self.autocast,
            blind=blind,
            blind_seed=p.seed,
        )
