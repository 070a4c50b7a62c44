"""Reading a released checkpoint directory: JSON configs and safetensors tensors, nothing else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from llm2clip_vlm.errors import BadInputFileError
from llm2clip_vlm.weights import check_safetensors_file

# Weight files we never open: they are pickles (arbitrary code on load).
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "adapter_model.bin")


class ImportRefused(ValueError):
    """A checkpoint that does not match the layout an importer expects (the message says where)."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or :class:`ImportRefused` naming the file."""
    if not path.is_file():
        raise ImportRefused(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImportRefused(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ImportRefused(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_files(directory: Path, stem: str = "model") -> list[Path]:
    """``{stem}.safetensors``, or the shards listed in ``{stem}.safetensors.index.json``.

    Raises:
        ImportRefused: no safetensors weights (pickled weights are named and refused).
    """
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ImportRefused(f"{index}: no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ImportRefused(f"{index}: lists {f.name}, which is missing")
        return files
    pickles = [p.name for p in directory.iterdir() if p.name in PICKLE_WEIGHTS] if directory.is_dir() else []
    if pickles:
        raise ImportRefused(
            f"{directory}: only pickled weights ({', '.join(pickles)}); they can run code when loaded, so "
            "they are not read. Download the safetensors revision of the model."
        )
    raise ImportRefused(f"{directory}: no {stem}.safetensors (nor a sharded index)")


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors ``files`` (a name in two files is refused)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            check_safetensors_file(f, "checkpoint")  # a truncated file or a header that lies
            tensors = load_file(str(f))
        except (BadInputFileError, SafetensorError) as e:
            raise ImportRefused(f"{f}: not a readable safetensors file ({e})") from e
        for name, t in tensors.items():
            if name in state:
                raise ImportRefused(f"{f}: tensor {name!r} also appears in another shard")
            # transformers saves ``position_ids`` (an int64 index buffer, e.g. BAAI's EVA-CLIP port);
            # the layouts drop it. Any other integer tensor is refused.
            if not t.is_floating_point() and name.rsplit(".", 1)[-1] != "position_ids":
                raise ImportRefused(f"{f}: tensor {name!r} is {t.dtype}, a weight must be floating point")
            if not bool(torch.isfinite(t).all()):
                raise ImportRefused(f"{f}: tensor {name!r} holds NaN or inf values")
            state[name] = t
    return state


def expect_shape(
    state: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: Path
) -> torch.Tensor:
    """``state[name]`` with exactly ``shape``, or :class:`ImportRefused` naming the tensor."""
    if name not in state:
        raise ImportRefused(f"{where}: tensor {name!r} is missing")
    t = state[name]
    if tuple(t.shape) != shape:
        raise ImportRefused(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t
