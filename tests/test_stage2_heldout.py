"""Stage 2's held-out sets without an ``embed`` store: written by the store writer, then reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from store_driver import make_encoder_dir, make_records

from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.text.encoder import CaptionEncoder, encoder_identity
from llm2clip_vlm.vision.inputs import heldout_sets


def test_a_heldout_set_without_a_store_is_embedded_once_into_a_store(tmp_path: Path, monkeypatch) -> None:
    enc_dir = make_encoder_dir(tmp_path / "enc")
    identity = encoder_identity(enc_dir)
    records = make_records(9, seed=3)
    embed = EmbedConfig(dtype="fp32", batch_size=4, precision="fp32")
    cache = tmp_path / "run" / "heldout"

    sets = heldout_sets(
        {"coco": records}, tmp_path / "no-store", enc_dir, identity, cache, embed, lambda *_: None
    )

    hs = sets["coco"]
    texts = [c.text for r in records for c in r.captions]
    direct = CaptionEncoder.from_pretrained(enc_dir).encode(texts, batch_size=4)
    assert hs.text_embeddings.shape == direct.shape
    torch.testing.assert_close(hs.text_embeddings, direct, atol=1e-5, rtol=1e-4)
    assert hs.caption_image.tolist() == [i for i, r in enumerate(records) for _ in r.captions]
    # A store like embed's, in a directory of this encoder's identity.
    assert (cache / identity[:16] / "heldout-coco" / "manifest.json").is_file()

    # A restart reuses it: nothing is encoded again.
    def refuse(*_a, **_k):
        raise AssertionError("re-embedded a held-out set that has a store")

    monkeypatch.setattr(CaptionEncoder, "encode", refuse)
    again = heldout_sets(
        {"coco": records}, tmp_path / "no-store", enc_dir, identity, cache, embed, lambda *_: None
    )
    assert np.array_equal(again["coco"].text_embeddings.numpy(), hs.text_embeddings.numpy())


def test_a_heldout_set_without_a_store_or_an_encoder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="held-out set 'coco'"):
        heldout_sets(
            {"coco": make_records(3)}, tmp_path, None, "", tmp_path / "c", EmbedConfig(), lambda *_: None
        )
