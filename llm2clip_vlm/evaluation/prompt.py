"""The conversation template a LLaVA model was trained with, and prompt formatting for evaluation.

A trained model directory holds ``llava_template.json`` =
``{"template": "vicuna_v1" | "plain" | "chat_template", "system": "..."}``; without it the model
is taken to be LLaVA-1.5-style (``vicuna_v1`` with LLaVA-1.5's system prompt). The formatting is
the template registry's (:mod:`llm2clip_vlm.llava.templates`), the one training and held-out
scoring use: LLaVA's ``Conversation.get_prompt`` for ``SeparatorStyle.TWO`` (vicuna_v1) and
``SeparatorStyle.PLAIN``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One source of truth for what training writes and evaluation reads.
from llm2clip_vlm.data.conversations import IMAGE_PLACEHOLDER as IMAGE_TOKEN
from llm2clip_vlm.llava.templates import (
    DEFAULT_TEMPLATE,
    REGISTRY,
    TEMPLATE_FILE,
    TEMPLATES,
    VICUNA_SYSTEM,
    get_template,
)


@dataclass(frozen=True)
class ChatTemplate:
    """Which template a model was trained with and its system prompt."""

    name: str = DEFAULT_TEMPLATE
    system: str = REGISTRY[DEFAULT_TEMPLATE].default_system

    def __post_init__(self) -> None:
        if self.name not in TEMPLATES:
            raise ValueError(f"unknown conversation template {self.name!r}; known: {', '.join(TEMPLATES)}")

    @property
    def needs_tokenizer(self) -> bool:
        """Whether prompts need the model's tokenizer (its chat template)."""
        return get_template(self.name).prompt_needs_tokenizer


def load_template(model_dir: str | Path, override: str | None = None) -> ChatTemplate:
    """The template of a model directory (``llava_template.json``; default vicuna_v1).

    Args:
        model_dir: a LLaVA model directory.
        override: a template name that wins over the file (keeps the file's system prompt, or the
            default one for vicuna_v1 and none for the others).

    Raises:
        ValueError: the file is not valid JSON or names an unknown template.
    """
    path = Path(model_dir) / TEMPLATE_FILE
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict) or "template" not in data:
            raise ValueError(f'{path}: expected {{"template": ..., "system": ...}}, got {data!r}')
    name = override or data.get("template", DEFAULT_TEMPLATE)
    default_system = REGISTRY[name].default_system if name in REGISTRY else ""  # unknown: refused below
    return ChatTemplate(name=name, system=data.get("system", default_system))


def with_image_tokens(text: str, n_images: int) -> str:
    """``<image>`` placeholders in front of the question, as LLaVA-1.5's evaluation puts them.

    Benchmarks' questions carry no placeholder; one per image goes first, then a newline. A text
    that already holds placeholders is left alone.
    """
    if n_images == 0 or IMAGE_TOKEN in text:
        return text
    return " ".join([IMAGE_TOKEN] * n_images) + "\n" + text


def format_conversation(
    template: ChatTemplate, turns: list[tuple[str, str | None]], tokenizer: Any = None
) -> str:
    """The prompt text for a conversation of (user, assistant) turns, from the template registry
    (:mod:`llm2clip_vlm.llava.templates`) that training uses too.

    The last assistant message may be ``None``: the prompt then ends where the model answers
    (``... ASSISTANT:`` for vicuna_v1). A given assistant message is closed with the end of turn
    (``</s>`` for vicuna_v1, a newline for plain).

    Args:
        template: the model's template.
        turns: ``[(user_text, assistant_text_or_None), ...]``.
        tokenizer: needed for ``chat_template`` (its ``apply_chat_template``).

    Raises:
        ValueError: an open (``None``) assistant turn that is not the last, or ``chat_template``
            without a tokenizer that has a chat template.
    """
    return get_template(template.name).prompt(turns, tokenizer, template.system)


def answer_separator(template: ChatTemplate) -> str:
    """What joins a prompt ending where the model answers and the answer's text."""
    return get_template(template.name).answer_separator


__all__ = [
    "IMAGE_TOKEN",
    "TEMPLATES",
    "TEMPLATE_FILE",
    "VICUNA_SYSTEM",
    "ChatTemplate",
    "answer_separator",
    "format_conversation",
    "load_template",
    "with_image_tokens",
]
