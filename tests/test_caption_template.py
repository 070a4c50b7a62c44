"""The Llama-3 chat header around captions: resolved per encoder, stored with it, pooled as the
reference pools it (hand-checked strings, and the reference's own mask rule as the oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional, load_tokenizer
from llm2clip_vlm.text.pooling import (
    LLAMA3_CHAT_TEMPLATE,
    format_query,
    mean_pool,
    resolve_caption_template,
    tokenize,
)
from llm2clip_vlm.text.tiny import tiny_config, tiny_tokenizer

HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
SEPARATOR = "!@#$%^&*()"  # LLM2Vec's instruction separator


def llama3_like_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tok.chat_template = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    )
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    return tok


def reference_embed_mask(tok, texts: list[str], max_length: int = 64) -> torch.Tensor:
    """microsoft/LLM2CLIP llm2clip/llm2vec/llm2vec.py:174-181 (prepare_for_tokenization, Llama-3
    Instruct branch) and :215-253 (tokenize): the pooled tokens are the last
    len(tokenize(text after the separator)) tokens. Copied logic (MIT License, Microsoft)."""
    prepared = [HEADER + t.strip() + "<|eot_id|>" for t in texts]
    masks = []
    original = tok(["".join(p.split(SEPARATOR)) for p in prepared], return_tensors="pt", padding=True,
                   truncation=True, max_length=max_length)  # fmt: skip
    for i, p in enumerate(prepared):
        parts = p.split(SEPARATOR)
        after = parts[1] if len(parts) > 1 else ""
        ids = tok([after], add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"][0]
        m = torch.zeros_like(original["attention_mask"][i])
        if ids:
            m[-len(ids) :] = 1
        masks.append(m)
    return torch.stack(masks), original


def test_auto_is_the_llama3_header_for_llama3_chat_tokenizers_only() -> None:
    assert resolve_caption_template("auto", llama3_like_tokenizer()) == LLAMA3_CHAT_TEMPLATE
    assert LLAMA3_CHAT_TEMPLATE == HEADER + "{text}<|eot_id|>"
    assert resolve_caption_template("auto", tiny_tokenizer()) is None  # no Llama-3 chat template
    assert resolve_caption_template("none", llama3_like_tokenizer()) is None
    assert resolve_caption_template("[{text}]", tiny_tokenizer()) == "[{text}]"
    with pytest.raises(ValueError, match="exactly once"):
        resolve_caption_template("no field", tiny_tokenizer())
    # Idempotent: a resolved template resolves to itself.
    assert resolve_caption_template(LLAMA3_CHAT_TEMPLATE, tiny_tokenizer()) == LLAMA3_CHAT_TEMPLATE


def test_wrapped_strings_hand_checked() -> None:
    text, start = format_query("a red circle ", None, LLAMA3_CHAT_TEMPLATE)
    assert text == "<|start_header_id|>user<|end_header_id|>\n\na red circle<|eot_id|>"
    assert text[start:] == "a red circle<|eot_id|>"
    text, start = format_query("a red circle", "Given a sentence", LLAMA3_CHAT_TEMPLATE)
    assert text == "<|start_header_id|>user<|end_header_id|>\n\nGiven a sentence; a red circle<|eot_id|>"
    assert text[start:] == "a red circle<|eot_id|>"
    assert format_query("a red circle", None, None) == ("a red circle", 0)


def test_pooled_tokens_are_the_references() -> None:
    tok = llama3_like_tokenizer()
    captions = ["a red circle", "two green triangles above a yellow star"]
    # Stage-2 extraction: bare captions (llm2vec.encode puts the separator in front of each).
    ours = tokenize(tok, captions, None, 64, None, LLAMA3_CHAT_TEMPLATE)
    ref_mask, ref = reference_embed_mask(tok, [SEPARATOR + c for c in captions])
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["embed_mask"], ref_mask)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert (ours["input_ids"][:, -1] == eot).all() and ours["embed_mask"][:, -1].all()  # eot pooled
    # Stage-1 queries (E5_cc3m.py:131: f"{instruction}; " + separator + query).
    instr = "Given a sentence, retrieve a detailed relevant sentence"
    ours = tokenize(tok, captions, instr, 64, None, LLAMA3_CHAT_TEMPLATE)
    ref_mask, ref = reference_embed_mask(tok, [f"{instr}; " + SEPARATOR + c for c in captions])
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["embed_mask"], ref_mask)


def test_template_is_stored_with_the_encoder(tmp_path: Path) -> None:
    tok = llama3_like_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok))).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    ref = ModelRef(str(tmp_path / "llm"))
    model, tok = load_bidirectional(ref, attn_implementation="eager"), load_tokenizer(ref)
    enc = CaptionEncoder(model, tok, 64, pad_to_multiple_of=None, caption_template=LLAMA3_CHAT_TEMPLATE)
    bare = CaptionEncoder(model, tok, 64, pad_to_multiple_of=None)
    assert enc.identity() != bare.identity()
    enc.save_pretrained(tmp_path / "enc")
    again = CaptionEncoder.from_pretrained(tmp_path / "enc", device="cpu")
    assert again.caption_template == LLAMA3_CHAT_TEMPLATE and again.identity() == enc.identity()
    got = again.encode(["a red circle"])
    batch = tokenize(tok, ["a red circle"], None, 64, None, LLAMA3_CHAT_TEMPLATE)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert torch.allclose(got, mean_pool(hidden, batch["embed_mask"]), atol=1e-5)
    assert not torch.allclose(got, bare.encode(["a red circle"]), atol=1e-3)
