"""Caption pooling (instruction and padding excluded) and the CaptionEncoder save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm2clip_vlm.text.encoder import ENCODER_FILE, CaptionEncoder
from llm2clip_vlm.text.modeling import ModelRef, decoder_of, load_bidirectional, load_tokenizer
from llm2clip_vlm.text.pooling import mean_pool, tokenize
from llm2clip_vlm.text.tiny import save_tiny_llm

INSTR = "Given a sentence, retrieve a detailed relevant sentence"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("enc") / "llama")


def test_mean_pool_hand_built() -> None:
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    # row 0: mean of positions 2,3 = ([4,5]+[6,7])/2; row 1: mean of 9..15 at positions 1..3
    expected = torch.tensor([[5.0, 6.0], [12.0, 13.0]])
    assert torch.equal(mean_pool(hidden, mask), expected)


def test_embed_mask_marks_caption_tokens_only(tiny: Path) -> None:
    tok = load_tokenizer(ModelRef(str(tiny)))
    texts = ["a red circle", "two green triangles above a yellow star"]
    enc = tokenize(tok, texts, instruction=INSTR, max_length=64, pad_to_multiple_of=16)
    assert enc["input_ids"].shape[1] % 16 == 0
    for row, text in enumerate(texts):
        caption_ids = tok(" " + text, add_special_tokens=False)["input_ids"]
        n = len(caption_ids)
        mask = enc["embed_mask"][row]
        # exactly the last n positions (left padding): no instruction, no BOS, no padding
        assert mask.sum().item() == n
        assert mask[-n:].all() and not mask[:-n].any()
        assert enc["input_ids"][row, -n:].tolist() == caption_ids
        n_real = enc["attention_mask"][row].sum().item()
        assert n_real > n  # the instruction and BOS are attended to, just not pooled
    plain = tokenize(tok, texts, max_length=64)
    for row in range(len(texts)):
        # without an instruction, every non-special token is a caption token (BOS excluded)
        assert plain["embed_mask"][row].sum().item() == plain["attention_mask"][row].sum().item() - 1


def test_caption_cut_by_max_length_is_refused(tiny: Path) -> None:
    tok = load_tokenizer(ModelRef(str(tiny)))
    with pytest.raises(ValueError, match="no tokens left to pool"):
        tokenize(tok, ["a red circle"], instruction=INSTR, max_length=4)
    with pytest.raises(ValueError, match="no tokens left to pool"):
        tokenize(tok, [""], max_length=16)


def test_padding_does_not_change_embeddings(tiny: Path) -> None:
    ref = ModelRef(str(tiny))
    enc = CaptionEncoder(load_bidirectional(ref), load_tokenizer(ref), max_length=64)
    texts = ["a red circle", "two green triangles above a yellow star on a white background", "a blue square"]
    together = enc.encode(texts, batch_size=3)
    alone = torch.cat([enc.encode([t]) for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert together.dtype == torch.float32 and together.shape == (3, enc.hidden_size)
    # The instruction changes a query's embedding (it is attended to) but is not pooled.
    assert not torch.allclose(enc.encode(texts[:1], instruction=INSTR), together[:1])


def test_save_load_round_trip(tiny: Path, tmp_path: Path) -> None:
    ref = ModelRef(str(tiny))
    lm = load_bidirectional(ref, with_lm_head=True)
    enc = CaptionEncoder(
        decoder_of(lm), load_tokenizer(ref), max_length=48, instructions={"short_query": INSTR},
        pad_to_multiple_of=8,
    )  # fmt: skip
    texts = ["a red circle", "three large orange circles and one black square near the bottom"]
    before = enc.encode(texts)
    out = enc.save_pretrained(tmp_path / "encoder")
    assert (out / "model.safetensors").is_file()
    meta = json.loads((out / ENCODER_FILE).read_text())
    assert meta["max_length"] == 48 and meta["dim"] == enc.hidden_size and meta["pooling"] == "mean"
    loaded = CaptionEncoder.from_pretrained(out, device="cpu")
    assert loaded.max_length == 48 and loaded.instructions == {"short_query": INSTR}
    assert loaded.pad_to_multiple_of == 8  # embed pads as stage 1 did (a speed setting)
    assert torch.equal(loaded.encode(texts), before)
    assert loaded.identity() == enc.identity() == meta["identity"]
    # Different weights -> different identity.
    other = CaptionEncoder(
        load_bidirectional(ModelRef(str(save_tiny_llm(tmp_path / "o", seed=1)))),
        enc.tokenizer,
        48,
        {"short_query": INSTR},
    )
    assert other.identity() != enc.identity()
    with pytest.raises(FileNotFoundError, match=ENCODER_FILE):
        CaptionEncoder.from_pretrained(tiny)
