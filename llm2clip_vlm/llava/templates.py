"""Conversation templates of LLaVA-1.5 and their label masks, exact to the token.

A LLaVA record's ``conversations`` (alternating ``human`` / ``gpt`` turns, the first human turn
holding one ``<image>``) become one token sequence and its labels:

- ``plain`` (projector pretraining, LLaVA's ``conv_llava_plain``): the human turn is dropped and
  replaced by the image; the text is ``<image>`` + the caption + ``"\\n"``, and the loss is on the
  caption and the newline.
- ``vicuna_v1`` (instruction tuning, LLaVA's ``conv_vicuna_v1``):
  ``"{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"``; the loss
  is on every assistant answer and the ``</s>`` (the tokenizer's eos) after it, nothing else.
- ``chat_template``: the LLM's own chat template (``tokenizer.apply_chat_template``); the loss is
  on every assistant message and the end-of-turn token right after it.

[IMPORTANT] LLaVA computes its masks by re-tokenizing pieces of the prompt and subtracting
lengths, which silently goes wrong when a tokenizer merges across a piece boundary (its
"tokenization mismatch" warning). Here the whole conversation is tokenized once, with character
offsets, and a token is supervised iff its characters lie inside an answer span. The mask is
exact by construction for any fast tokenizer (a token counts as supervised when any of its
characters does, so a space glued to an answer's first word goes with the answer, as in LLaVA;
vicuna_v1 spans start at the space before the answer, so a space that is a token of its own is
learnt too, as in LLaVA); ``tests/test_llava_templates.py`` pins it on hand-checked examples.

The ``<image>`` placeholder stays one token here; the collator expands it to the number of
image features the model produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

IGNORE_INDEX = -100
# Written into every trained model directory: which template (and system prompt) it learnt.
TEMPLATE_FILE = "llava_template.json"
IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat_template")
TemplateName = Literal["plain", "vicuna_v1", "chat_template"]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The vicuna_v1 prompt as a Jinja chat template, saved with the processor so that transformers'
# ``apply_chat_template`` (lmms-eval, serving engines) builds the same prompt the model learnt.
VICUNA_V1_JINJA = (
    "{% set sys = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set sys = message['content'] %}{% endif %}{% endfor %}"
    "{{ sys + ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class ConversationError(ValueError):
    """A record whose conversation a template cannot use (the message says why)."""


@dataclass(frozen=True)
class Tokenized:
    """One conversation as tokens: ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def conversation_turns(conversations: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` of a LLaVA conversation, checked for shape."""
    if not conversations:
        raise ConversationError("empty conversation")
    if len(conversations) % 2:
        raise ConversationError(f"{len(conversations)} turns: expected human/gpt pairs")
    pairs = []
    for i in range(0, len(conversations), 2):
        q, a = conversations[i], conversations[i + 1]
        if not isinstance(q, dict) or not isinstance(a, dict):
            raise ConversationError(f"turn {i} is not an object with 'from' and 'value'")
        if q.get("from") != "human" or a.get("from") != "gpt":
            raise ConversationError(
                f"turns {i}-{i + 1} are from {q.get('from')!r}/{a.get('from')!r}; expected 'human' then 'gpt'"
            )
        qv, av = q.get("value"), a.get("value")
        if not isinstance(qv, str) or not isinstance(av, str):
            raise ConversationError(f"turns {i}-{i + 1}: 'value' must be text")
        if not av.strip():
            raise ConversationError(f"turn {i + 1}: empty answer")
        pairs.append((qv, av))
    return pairs


def check_image_placeholders(conversations: Sequence[dict[str, Any]], has_image: bool) -> None:
    """An image record has exactly one ``<image>``, in the first human turn; a text-only one none.

    Raises:
        ConversationError: the placeholder is missing, repeated, misplaced or unexpected.
    """
    counts = [str(t.get("value", "")).count(IMAGE_PLACEHOLDER) for t in conversations if isinstance(t, dict)]
    total = sum(counts)
    if has_image:
        if total == 0:
            raise ConversationError("record has an image but no <image> in its conversation")
        if total > 1:
            raise ConversationError(f"<image> appears {total} times; LLaVA-1.5 records have exactly one")
        if not counts or counts[0] != 1:
            raise ConversationError("<image> must be in the first human turn")
    elif total:
        raise ConversationError("text-only record (no 'image') contains <image>")


def _normalise_image_turn(question: str) -> str:
    """LLaVA puts the image first: ``"Q\\n<image>"`` and ``"<image>\\nQ"`` both become the latter."""
    if IMAGE_PLACEHOLDER not in question:
        return question
    rest = question.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}" if rest else IMAGE_PLACEHOLDER


def render(
    template: TemplateName,
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    system: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text of a conversation and the character spans that carry the loss.

    Args:
        template: ``plain``, ``vicuna_v1`` or ``chat_template``.
        conversations: LLaVA turns (``{"from": "human"|"gpt", "value": ...}``).
        tokenizer: the LLM's tokenizer (its eos ends vicuna_v1 answers; its chat template for
            ``chat_template``).
        system: system prompt (vicuna_v1 default: LLaVA-1.5's).

    Returns:
        ``(text, spans)``: ``spans`` are ``[start, end)`` character ranges of supervised text.
    """
    pairs = conversation_turns(conversations)
    if template == "plain":
        # LLaVA's preprocess_plain: the human turn is replaced by the image alone.
        answer = pairs[0][1]
        text = f"{IMAGE_PLACEHOLDER}{answer}\n"
        return text, [(len(IMAGE_PLACEHOLDER), len(text))]
    if template == "vicuna_v1":
        eos = tokenizer.eos_token
        if not eos:
            raise ConversationError("vicuna_v1 needs a tokenizer with an eos token to end answers")
        text = (VICUNA_SYSTEM if system is None else system) + " "
        spans = []
        for i, (q, a) in enumerate(pairs):
            q = _normalise_image_turn(q) if i == 0 else q
            text += f"USER: {q} ASSISTANT:"
            # The space before the answer belongs to the answer's span. LLaVA masks
            # len(tokenize("... ASSISTANT: ")) - 2 tokens of a round (haotian-liu/LLaVA
            # llava/train/train.py:471-475, :481): the -2 drops the BOS and the token holding the
            # trailing space, so that token is learnt. It matters when the space is a token of its
            # own (Llama SentencePiece before a digit: "▁", "3"); a space glued to the first word
            # ("▁Yes", " yes") is learnt either way.
            start = len(text)
            text += " " + a + eos
            spans.append((start, len(text)))
        return text, spans
    if template == "chat_template":
        if not getattr(tokenizer, "chat_template", None):
            raise ConversationError("template 'chat_template' but the tokenizer has no chat template")
        messages = [] if system is None else [{"role": "system", "content": system}]
        for i, (q, a) in enumerate(pairs):
            messages.append({"role": "user", "content": _normalise_image_turn(q) if i == 0 else q})
            messages.append({"role": "assistant", "content": a})
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans, pos = [], 0
        end_of_turn = tokenizer.eos_token or ""
        for _, a in pairs:
            start = text.find(a, pos)
            if start < 0:
                raise ConversationError("the chat template changed an answer's text; cannot locate it")
            end = start + len(a)
            # The end-of-turn token after the answer is learnt too (it stops generation).
            if end_of_turn and text.startswith(end_of_turn, end):
                end += len(end_of_turn)
            spans.append((start, end))
            pos = end
        return text, spans
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def generation_prompt(
    template: TemplateName, question: str, tokenizer: Any, system: str | None = None, has_image: bool = True
) -> str:
    """The prompt for answering ``question`` (one turn), ending where the answer starts."""
    q = _normalise_image_turn(question)
    if has_image and IMAGE_PLACEHOLDER not in q:
        q = f"{IMAGE_PLACEHOLDER}\n{q}"
    if template == "plain":
        return IMAGE_PLACEHOLDER if has_image else ""
    if template == "vicuna_v1":
        return f"{VICUNA_SYSTEM if system is None else system} USER: {q} ASSISTANT:"
    if template == "chat_template":
        messages = [] if system is None else [{"role": "system", "content": system}]
        messages.append({"role": "user", "content": q})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")


def tokenize_conversation(
    template: TemplateName,
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    system: str | None = None,
) -> Tokenized:
    """Token ids and labels of a conversation (see the module docstring for the masking rule).

    The tokenizer's own special tokens (e.g. a BOS) are added as it adds them, unsupervised.

    Raises:
        ConversationError: the conversation does not fit the template.
    """
    text, spans = render(template, conversations, tokenizer, system)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok, (s, e) in zip(ids, offsets, strict=True):
        # A token is supervised when any of its characters is: byte-level BPE glues the space
        # before an answer to its first word (" yes"), which must still be learnt. (0, 0) offsets
        # are added special tokens (BOS): never supervised.
        inside = e > s and any(max(s, a) < min(e, b) for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return Tokenized(list(ids), labels)
