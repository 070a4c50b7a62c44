"""A tiny random-weight LLaVA-1.5 model directory, for tests and for trying ``llm2clip-vlm eval``.

A random CLIP tower (32 px, 16 patches) and a random two-layer Llama with the test tokenizer,
assembled by :func:`llm2clip_vlm.llava.assemble.build_llava_model` and saved the way trained
models are (transformers format + ``llava_template.json``). Its answers are noise: it checks the
plumbing, not the scores.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llm2clip_vlm.evaluation.prompt import TEMPLATE_FILE
from llm2clip_vlm.llava.assemble import build_llava_model
from llm2clip_vlm.llava.templates import DEFAULT_TEMPLATE, get_template
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower


def save_tiny_llava(path: str | Path, seed: int = 0, template: str = DEFAULT_TEMPLATE) -> Path:
    """Write a tiny random LLaVA model (model, processor, ``llava_template.json``) to ``path``.

    Returns:
        ``path``.
    """
    path = Path(path)
    shape = TowerShape(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
    )
    with tempfile.TemporaryDirectory() as tmp:
        tower = save_random_tower(Path(tmp) / "tower", "clip", shape, seed=seed)
        llm = save_tiny_llm(Path(tmp) / "llm", "llama", seed=seed + 1, hidden_size=48)
        model, processor = build_llava_model(tower, llm)
        model.save_pretrained(path)
        processor.save_pretrained(path)
    system = get_template(template).default_system
    (path / TEMPLATE_FILE).write_text(json.dumps({"template": template, "system": system}, indent=2) + "\n")
    return path


__all__ = ["save_tiny_llava"]
