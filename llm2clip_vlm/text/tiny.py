"""Tiny random-weight decoder LLMs with a real (fast, byte-level BPE) tokenizer, for tests.

No hub access: the tokenizer is trained in memory on a few sentences and the model is built from
a config, then both are saved with ``save_pretrained`` so tests exercise the same
``from_pretrained`` path as real models. Other stages' tests use :func:`save_tiny_llm` too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2", "gemma")

_CORPUS = [
    "a red circle on the left of a blue square",
    "two green triangles above a yellow star on a white background",
    "a photo of a small purple hexagon in the top right corner",
    "Given a sentence, retrieve a detailed relevant sentence",
    "Given a detailed sentence, retrieve a short relevant sentence",
    "three large orange circles and one black square near the bottom",
    "the quick brown fox jumps over the lazy dog",
]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (offsets supported) with ``<s>``/``</s>``, no mask token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Like Llama: BOS in front, no EOS appended.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_config(
    family: str = "llama", vocab_size: int = 320, hidden_size: int = 32, layers: int = 2
) -> PretrainedConfig:
    """A few-thousand-parameter config of one of the tested families (causal, as shipped)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def save_tiny_llm(
    path: str | Path, family: str = "llama", seed: int = 0, hidden_size: int = 32, layers: int = 2
) -> Path:
    """Save a random-weight causal-LM checkpoint + tokenizer to ``path`` (as a hub model would be).

    Args:
        path: output directory.
        family: ``llama``, ``mistral``, ``qwen2`` or ``gemma``.
        seed: weight initialisation seed.
        hidden_size: model width.
        layers: number of decoder layers.

    Returns:
        ``path``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = tiny_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer), hidden_size=hidden_size, layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


__all__ = ["FAMILIES", "save_tiny_llm", "tiny_config", "tiny_tokenizer"]
