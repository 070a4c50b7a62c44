"""The stage-1/stage-2 recipes read the captions the reference reads, and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize(
    "name",
    [
        "stage1-llama3-8b.yaml",
        "stage1-llama3-8b-qlora.yaml",
        "stage2-eva02-l-14-336.yaml",
        "stage2-openai-clip-vit-l-14-336.yaml",
        "stage2-siglip2-so400m.yaml",
    ],
)
def test_recipes_read_only_the_sub_captions(name: str) -> None:
    # microsoft/LLM2CLIP llm2clip/data/extract_embedding.py:12: _KEYS = ["shortSV_captions",
    # "longSV_captions"]; raw_caption is never embedded nor paired.
    train = yaml.safe_load((RECIPES / name).read_text())["data"]["train"]
    for entry in train if isinstance(train, list) else [train]:  # one set, or CC3M + CC12M
        assert entry["caption_columns"] == {"shortSV_captions": "short", "longSV_captions": "long"}
