"""Bidirectional attention per family: changing the last token changes the first token's state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel

from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional
from llm2clip_vlm.text.tiny import FAMILIES, save_tiny_llm

# Row 0 is left-padded (two pad positions), row 1 is full: the padded case is where the old trick failed.
IDS = torch.tensor([[1, 1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
FIRST = [2, 0]  # first real token of each row


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_llm(root / f, family=f) for f in FAMILIES}


def row_changes(model: torch.nn.Module) -> list[float]:
    """Per row: largest change of the first real token's last hidden state when the last token changes."""
    changed = IDS.clone()
    changed[:, -1] = 20
    with torch.no_grad():
        a = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        b = model(input_ids=changed, attention_mask=MASK).last_hidden_state
    return [(a[r, FIRST[r]] - b[r, FIRST[r]]).abs().max().item() for r in range(len(FIRST))]


def first_token_change(model: torch.nn.Module) -> float:
    """The smallest per-row change: > 0 means every row, padded or not, is bidirectional."""
    return min(row_changes(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bidirectional_per_family(tiny_dirs: dict[str, Path], family: str, attn: str) -> None:
    model = load_bidirectional(ModelRef(str(tiny_dirs[family])), attn_implementation=attn)
    assert model.config.is_causal is False
    assert first_token_change(model) > 1e-4

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert first_token_change(peft_model) > 1e-4
    merged = peft_model.merge_and_unload()
    assert first_token_change(merged) > 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_control_and_old_trick_stay_causal(tiny_dirs: dict[str, Path], family: str, attn: str) -> None:
    causal = AutoModel.from_pretrained(tiny_dirs[family], attn_implementation=attn).eval()
    assert row_changes(causal) == [0.0, 0.0]
    # The llm2vec-era trick flips the attribute on each attention layer; under transformers 5.x
    # the mask is still built causal, so nothing changes (why we set config.is_causal instead).
    for module in causal.modules():
        if hasattr(module, "is_causal") and module is not causal:
            module.is_causal = False
    assert row_changes(causal)[0] == 0.0  # the left-padded row stays causal


def test_bidirectional_flag_round_trips_through_config_json(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model = load_bidirectional(ModelRef(str(tiny_dirs["llama"])))
    model.save_pretrained(tmp_path / "saved")
    assert '"is_causal": false' in (tmp_path / "saved" / "config.json").read_text()
    plain = AutoModel.from_pretrained(tmp_path / "saved").eval()  # no special loading code
    assert first_token_change(plain) > 1e-4
