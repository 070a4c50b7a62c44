"""The released text adaptor (the reference ``TextProj``) as our ``TextAdaptor``; shared names.

Used by every released-tower import (:mod:`llm2clip_vlm.imports.tower` for the OpenAI-CLIP layout,
:mod:`llm2clip_vlm.imports.released_families` for EVA02 and SigLIP2).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from llm2clip_vlm.imports.checkpoint import ImportRefused, expect_shape

TOWER_DIR, MODEL_DIR = "tower", "model"
PROVENANCE_FILE = "llm2clip_import.json"
_BLOCK = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.fn\.0\.weight$")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_adaptor(state: dict[str, torch.Tensor], where: Path) -> tuple[str, int]:
    """The adaptor's key prefix and its number of residual blocks, found from the tensor names."""
    prefixes: dict[str, set[int]] = {}
    for name in state:
        m = _BLOCK.match(name)
        if m:
            prefixes.setdefault(m["prefix"], set()).add(int(m["index"]))
    if not prefixes:
        raise ImportRefused(f"{where}: no text adaptor (no tensor named like '<prefix>0.fn.0.weight')")
    if len(prefixes) > 1:
        raise ImportRefused(
            f"{where}: several adaptor-like tensor groups ({', '.join(sorted(prefixes))}); expected one"
        )
    prefix, indices = next(iter(prefixes.items()))
    n = len(indices)
    if indices != set(range(n)):
        raise ImportRefused(
            f"{where}: adaptor blocks {sorted(indices)} under {prefix!r} are not numbered 0..{n - 1}"
        )
    return prefix, n


def adaptor_state(
    state: dict[str, torch.Tensor], prefix: str, blocks: int, where: Path
) -> tuple[dict[str, torch.Tensor], list[str], int, int]:
    """Our ``TextAdaptor`` state dict from the reference ``TextProj`` tensors under ``prefix``.

    Returns:
        ``(ours, used_source_names, text_dim, embed_dim)``.
    """
    first = state[f"{prefix}0.fn.0.weight"]
    hidden, d = int(first.shape[0]), int(first.shape[1])
    proj_w = f"{prefix}{blocks + 1}.weight"
    if proj_w not in state or state[proj_w].ndim != 2:
        raise ImportRefused(f"{where}: tensor {proj_w!r} (the adaptor's last Linear) is missing or not 2-d")
    e = int(state[proj_w].shape[0])
    names = {}
    for i in range(blocks):
        names[f"blocks.{i}.norm.weight"] = (f"{prefix}{i}.ln.weight", (d,))
        names[f"blocks.{i}.norm.bias"] = (f"{prefix}{i}.ln.bias", (d,))
        names[f"blocks.{i}.fc1.weight"] = (f"{prefix}{i}.fn.0.weight", (hidden, d))
        names[f"blocks.{i}.fc1.bias"] = (f"{prefix}{i}.fn.0.bias", (hidden,))
        names[f"blocks.{i}.fc2.weight"] = (f"{prefix}{i}.fn.3.weight", (d, hidden))
        names[f"blocks.{i}.fc2.bias"] = (f"{prefix}{i}.fn.3.bias", (d,))
    names["norm.weight"] = (f"{prefix}{blocks}.weight", (d,))
    names["norm.bias"] = (f"{prefix}{blocks}.bias", (d,))
    names["proj.weight"] = (proj_w, (e, d))
    # proj_bias=True in the reference (model.py:232,238): a missing bias is a different model.
    names["proj.bias"] = (f"{prefix}{blocks + 1}.bias", (e,))
    if hidden != 2 * d:
        raise ImportRefused(
            f"{where}: tensor {prefix}0.fn.0.weight widens {d} -> {hidden}; the reference expands x2"
        )
    ours = {k: expect_shape(state, src, shape, where) for k, (src, shape) in names.items()}
    return ours, [src for src, _ in names.values()], d, e
