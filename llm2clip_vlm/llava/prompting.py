"""LLaVA model inputs from a template's text: one builder for training, held-out scoring and lmms-eval.

A conversation (or a question) becomes text through its template (:mod:`llm2clip_vlm.llava.templates`),
the text becomes token ids LLaVA's way around ``<image>`` (:func:`~llm2clip_vlm.llava.templates.tokenize_image_chunks`),
and each ``<image>`` token becomes the ``image_seq_length`` positions the model fills with the
projected image features (:func:`expand_image_tokens`). Training's samples, the held-out answers
(:mod:`llm2clip_vlm.llava.evaluate`) and the lmms-eval model (:mod:`llm2clip_vlm.evaluation.lmms_model`)
all go through these functions, so a model is asked a question with exactly the tokens it learnt
from (``tests/test_llava_prompting.py`` pins it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from llm2clip_vlm.llava.templates import IGNORE_INDEX, TemplateName, generation_prompt, tokenize_image_chunks


def expand_image_tokens(
    ids: Sequence[int], labels: Sequence[int] | None, image_token_id: int, image_seq_length: int
) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` with every ``<image>`` token repeated ``image_seq_length`` times (no loss
    on them); ``labels`` None: ids only (the labels returned are then empty)."""
    out_ids: list[int] = []
    out_labels: list[int] = []
    for k, t in enumerate(ids):
        n = image_seq_length if t == image_token_id else 1
        out_ids += [t] * n
        if labels is not None:
            out_labels += [IGNORE_INDEX] * n if t == image_token_id else [labels[k]]
    return out_ids, out_labels


def prompt_ids(text: str, tokenizer: Any, image_token_id: int, image_seq_length: int) -> list[int]:
    """The model's input ids of a prompt text (``<image>`` expanded), as training tokenizes."""
    return expand_image_tokens(
        tokenize_image_chunks(text, tokenizer)[0], None, image_token_id, image_seq_length
    )[0]


def generation_ids(
    template: TemplateName,
    question: str,
    tokenizer: Any,
    image_token_id: int,
    image_seq_length: int,
    system: str | None = None,
    has_image: bool = True,
) -> list[int]:
    """Input ids asking ``question`` (one turn) in ``template``, ending where the answer starts."""
    text = generation_prompt(template, question, tokenizer, system, has_image=has_image)
    return prompt_ids(text, tokenizer, image_token_id, image_seq_length)


def left_padded(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``rows``, left-padded: every prompt ends where generation starts."""
    t = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), t), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, t - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, t - len(r) :] = 1
    return input_ids, mask
