"""Tokenization with an instruction and mean pooling over the caption tokens only.

LLM2Vec's format (its E5 training data): a query is ``f"{instruction}; {text}"``, tokenized as one
string, and an ``embed_mask`` marks the tokens of ``text``; pooling averages the last hidden state
over those tokens only, so neither the instruction, nor special tokens, nor padding enter the
embedding. LLM2Vec finds the caption tokens as "the last len(tokenize(text)) tokens"; we use the
fast tokenizer's character offsets instead, which gives the same mask and stays exact when a
tokenizer appends special tokens or truncation cuts the caption.
"""

from __future__ import annotations

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

# The Llama-3 chat header the reference wraps every text in, for Llama-3 *Instruct* models, both
# in stage-1 training (microsoft/LLM2CLIP llm_caption_contrastive/run_supervised.py:50-55, :265)
# and when it extracts the stage-2 embeddings (llm2clip/llm2vec/llm2vec.py:174-181, forced by
# llm2clip/data/extract_embedding.py:70-72 setting _name_or_path to Meta-Llama-3-8B-Instruct).
LLAMA3_CHAT_TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"
TEXT_FIELD = "{text}"


def resolve_caption_template(setting: str, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The wrapping a caption encoder uses: ``None`` (bare text) or a string with one ``{text}``.

    ``"auto"`` is the reference's choice: the Llama-3 chat header when the tokenizer's chat template
    is Llama-3's (it uses ``<|start_header_id|>``, which only Llama-3 Instruct tokenizers ship a
    chat template with), else none. ``"none"`` is bare text; anything else is taken as a template.
    """
    if setting == "none":
        return None
    if setting == "auto":
        chat = getattr(tokenizer, "chat_template", None) or ""
        chat = chat if isinstance(chat, str) else str(chat)
        return LLAMA3_CHAT_TEMPLATE if "<|start_header_id|>" in chat and "<|eot_id|>" in chat else None
    if setting.count(TEXT_FIELD) != 1:
        raise ValueError(
            f"caption template {setting!r} must contain {TEXT_FIELD} exactly once (or be 'auto'/'none')"
        )
    return setting


def format_query(text: str, instruction: str | None, template: str | None = None) -> tuple[str, int]:
    """The string the model reads, and the character offset where the caption starts in it.

    With a ``template``, the text is wrapped as the reference's ``prepare_for_tokenization`` does
    (``prefix + text.strip() + suffix``); what follows the
    caption (e.g. ``<|eot_id|>``) is pooled with it, as LLM2Vec pools every token after its
    instruction separator (llm2clip/llm2vec/llm2vec.py:215-253).
    """
    if not instruction:
        inner, start = text, 0
    else:
        inner = f"{instruction.strip()}; "
        inner, start = inner + text, len(inner)
    if template is None:
        return inner, start
    prefix, suffix = template.split(TEXT_FIELD)
    # The reference strips "{instruction}; !@#$%^&*(){text}" as a whole: the instruction is
    # stripped already, the caption's leading space sits behind the separator, so only the end
    # changes.
    return prefix + inner.rstrip() + suffix, len(prefix) + start


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    instruction: str | list[str | None] | None = None,
    max_length: int = 512,
    pad_to_multiple_of: int | None = None,
    template: str | None = None,
) -> BatchEncoding:
    """Tokenize (left padding) and build the ``embed_mask`` of the caption tokens.

    Args:
        tokenizer: a fast tokenizer with ``padding_side == "left"``.
        texts: the captions.
        instruction: prepended to every text (queries only), or one per text (None = bare);
            excluded from pooling.
        max_length: truncation length in tokens (instruction included).
        pad_to_multiple_of: pad the batch length up to a multiple (stable kernel shapes).
        template: wrapping of every text (see :func:`format_query`); its suffix is pooled.

    Returns:
        ``input_ids``, ``attention_mask`` and ``embed_mask`` tensors of shape ``[B, T]``.
    """
    if not tokenizer.is_fast:
        raise ValueError("caption pooling needs a fast tokenizer (character offsets)")
    if tokenizer.padding_side != "left":
        raise ValueError("caption pooling expects left padding (tokenizer.padding_side='left')")
    instructions = instruction if isinstance(instruction, list) else [instruction] * len(texts)
    if len(instructions) != len(texts):
        raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
    formatted = [format_query(t, ins, template) for t, ins in zip(texts, instructions, strict=True)]
    enc = tokenizer(
        [f for f, _ in formatted],
        padding=True,
        truncation=True,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    offsets = enc.pop("offset_mapping")  # [B, T, 2]
    special = enc.pop("special_tokens_mask").bool()
    starts = torch.tensor([s for _, s in formatted]).unsqueeze(1)
    # A token belongs to the caption when it ends after the instruction prefix ("; " is the
    # prefix's last piece, so a leading-space caption token still ends past it).
    embed_mask = (offsets[..., 1] > starts) & (offsets[..., 1] > offsets[..., 0])
    embed_mask &= enc["attention_mask"].bool()
    if template is None:
        embed_mask &= ~special
    # With a template, special tokens written in the text (its suffix, e.g. <|eot_id|>) are pooled
    # as the reference pools them; those the tokenizer adds (BOS) have empty offsets, excluded above.
    empty = (embed_mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        i = empty[0]
        raise ValueError(
            f"caption {texts[i]!r} has no tokens left to pool (empty, or cut by max_length={max_length} "
            "after the instruction)"
        )
    enc["embed_mask"] = embed_mask.long()
    return enc


def mean_pool(hidden: torch.Tensor, embed_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden[b, t]`` over the positions where ``embed_mask[b, t] == 1``."""
    mask = embed_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
