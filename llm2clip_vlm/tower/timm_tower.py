"""timm-backed towers (EVA02 and other timm ViTs) behind the transformers vision-model surface.

The stage-2 export writes a timm tower in timm's own hub format (``config.json`` with
``architecture``, ``model.safetensors``) plus a CLIP ``preprocessor_config.json``; timm loads it
with ``timm.create_model("local-dir:<dir>", pretrained=True)``. :class:`TimmTowerModel` wraps
the loaded model so the tower can call it like a transformers vision model:
``model(pixel_values, output_hidden_states=True).hidden_states``, where index 0 is the input of
the first block (the embeddings, as in transformers) and ``i`` the output of block ``i - 1``.
Hidden states are captured with hooks on ``model.blocks`` while ``forward_features`` runs, so any
timm ViT whose blocks carry the token sequence (prefix tokens first) works unchanged.

timm is optional (``pip install 'llm2clip-vlm[timm]'``) and imported only here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.errors import MissingDependencyError


@dataclass
class TimmTowerConfig:
    """The fields the tower reads, taken from the timm model itself."""

    architecture: str
    hidden_size: int
    image_size: int
    patch_size: int
    num_hidden_layers: int
    num_prefix_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TimmTowerOutput:
    """The part of a transformers vision output the tower uses."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise MissingDependencyError(
            "this tower is timm-backed and needs timm: pip install 'llm2clip-vlm[timm]'"
        ) from e
    return timm


def _read_hub_config(path: Path) -> dict[str, Any]:
    cfg = json.loads((path / "config.json").read_text())
    if "architecture" not in cfg:
        raise ValueError(f"{path / 'config.json'}: not a timm config (no 'architecture')")
    return cfg


def config_from_model(model: nn.Module, architecture: str) -> TimmTowerConfig:
    """Read the tower fields off a timm ViT.

    Raises:
        ValueError: the model has no ``blocks``/``patch_embed`` (not a ViT-like timm model).
    """
    blocks, patch_embed = getattr(model, "blocks", None), getattr(model, "patch_embed", None)
    if blocks is None or patch_embed is None:
        raise ValueError(f"timm model {architecture!r} is not a ViT (needs .blocks and .patch_embed)")

    def first(v: Any) -> int:
        return int(v[0] if isinstance(v, (tuple, list)) else v)

    return TimmTowerConfig(
        architecture=architecture,
        hidden_size=int(getattr(model, "embed_dim", None) or model.num_features),
        image_size=first(patch_embed.img_size),
        patch_size=first(patch_embed.patch_size),
        num_hidden_layers=len(blocks),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)),
    )


def load_timm_config(path: Path) -> TimmTowerConfig:
    """The tower config without loading weights (the model is built on the meta device).

    Some timm models compute Python numbers from tensors while they are built (timm's ``Eva``:
    ``torch.linspace(...).item()`` for the drop-path rates), which the meta device cannot; those
    are built on the CPU instead, still without weights.
    """
    timm = _import_timm()
    cfg = _read_hub_config(path)

    def build() -> nn.Module:
        return timm.create_model(
            cfg["architecture"], pretrained=False, num_classes=0, **cfg.get("model_args", {})
        )

    try:
        with torch.device("meta"):
            model = build()
    except (RuntimeError, NotImplementedError):
        model = build()
    return config_from_model(model, cfg["architecture"])


def _single_device(device_map: Any) -> Any:
    # A timm model is one module: accept a device, or a device_map that puts everything on one.
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"a timm tower runs on a single device; got device_map {device_map!r}")
        return device_map[""]
    return device_map


def load_timm_model(path: Path, device_map: Any) -> TimmTowerModel:
    """Load the timm tower at ``path`` with its weights, wrapped for the tower."""
    timm = _import_timm()
    cfg = _read_hub_config(path)
    model = timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=0)
    wrapped = TimmTowerModel(model, config_from_model(model, cfg["architecture"]))
    device = _single_device(device_map)
    if device is not None:
        wrapped.to(device)
    return wrapped


class TimmTowerModel(nn.Module):
    """A timm ViT called like a transformers vision model (``hidden_states`` via block hooks)."""

    def __init__(self, model: nn.Module, config: TimmTowerConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self._captured: list[torch.Tensor] | None = None
        blocks = list(model.blocks)
        blocks[0].register_forward_pre_hook(self._capture_input)
        for block in blocks:
            block.register_forward_hook(self._capture_output)

    def _capture_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._captured is not None:
            self._captured.append(args[0])

    def _capture_output(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        if self._captured is not None:
            self._captured.append(output)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> TimmTowerOutput:
        """``forward_features`` of the timm model; with ``output_hidden_states``, every block's tokens."""
        if not output_hidden_states:
            return TimmTowerOutput(self.model.forward_features(pixel_values), None)
        self._captured = []
        try:
            last = self.model.forward_features(pixel_values)
            states = tuple(self._captured)
        finally:
            self._captured = None
        if len(states) != self.config.num_hidden_layers + 1:
            raise RuntimeError(
                f"timm tower {self.config.architecture}: captured {len(states)} hidden states, expected "
                f"{self.config.num_hidden_layers + 1} (are its blocks called once each, in order?)"
            )
        return TimmTowerOutput(last, states)
