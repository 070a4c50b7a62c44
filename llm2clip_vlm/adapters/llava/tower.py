"""``LLM2CLIPVisionTower``: an exported LLM2CLIP tower behind LLaVA-1.5's ``CLIPVisionTower`` surface.

LLaVA-1.5 (``llava/model/multimodal_encoder/clip_encoder.py``) and LLaVA-NeXT build the vision
tower as ``Tower(name, args, delay_load)``, call ``load_model()``, move it with
``.to(device=, dtype=)``, take ``image_processor`` for their data pipeline, and call
``tower(images)`` on a ``[B, 3, H, W]`` tensor or a list of ``[3, H, W]`` tensors. This class keeps
that contract point by point, and also loads towers LLaVA cannot (SigLIP, registered formats),
from a local directory or an ``llm2clip:<dir>`` name, offline.

Attribute names follow LLaVA's (``vision_tower`` is the wrapped model, ``cfg_only`` the config
before loading), so LLaVA's checkpoints (``...vision_tower.vision_tower.<weights>``) and code that
reaches into them keep working.

The forward is the raw model call plus one slice: ``bench tower`` measures the difference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.tower.formats import (
    TowerFormat,
    detect_tower_format,
    load_tower_model,
    resolve_tower_path,
)
from llm2clip_vlm.tower.image_processor import llava_image_processor

log = get_logger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")


class LLM2CLIPVisionTower(nn.Module):
    """A frozen LLM2CLIP vision encoder with LLaVA-1.5's ``CLIPVisionTower`` duck type.

    Args:
        vision_tower: a local tower directory, optionally prefixed ``llm2clip:``.
        args: LLaVA's model args/config: ``mm_vision_select_layer`` (default -2),
            ``mm_vision_select_feature`` ("patch" drops the CLS token, "cls_patch" keeps it; a
            backbone without CLS, like SigLIP, returns all its tokens for both), and
            ``unfreeze_mm_vision_tower`` (load weights even when ``delay_load``).
        delay_load: read only the config now; ``load_model()`` loads the weights later.

    Raises:
        FileNotFoundError: the tower directory does not exist (nothing is downloaded).
        ValueError: unknown tower type, ``mm_vision_select_feature`` or a layer out of range.
    """

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer: int = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature: str = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"{vision_tower}: unexpected mm_vision_select_feature {self.select_feature!r}; "
                f"expected one of {', '.join(SELECT_FEATURES)}"
            )
        self._path = resolve_tower_path(vision_tower)
        self._format: TowerFormat = detect_tower_format(self._path)
        self.cfg_only = self._format.load_config(self._path)
        self._prefix_tokens = int(self._format.num_prefix_tokens(self.cfg_only))
        # The first token kept from the selected hidden state: "patch" drops CLS (and registers).
        self._first_token = self._prefix_tokens if self.select_feature == "patch" else 0
        self._check_select_layer(self.cfg_only)

        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            # LLaVA loads at once when the checkpoint carries tower weights to fine-tune.
            self.load_model()

    def _check_select_layer(self, config: Any) -> None:
        # hidden_states holds the embeddings plus one entry per block.
        n = int(config.num_hidden_layers) + 1
        if not -n <= self.select_layer < n:
            raise ValueError(
                f"{self.vision_tower_name}: mm_vision_select_layer {self.select_layer} is out of range "
                f"for a tower with {n - 1} layers (valid: {-n}..{n - 1})"
            )

    def load_model(self, device_map: Any = None) -> None:
        """Load the image processor and the weights, frozen; a second call does nothing.

        Args:
            device_map: passed to ``from_pretrained`` (e.g. ``"auto"``, ``{"": 0}``).
        """
        if self.is_loaded:
            log.info("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        self.image_processor = llava_image_processor(self._format.load_image_processor(self._path))
        self.vision_tower = load_tower_model(self._path, self._format, device_map)
        self.vision_tower.requires_grad_(False)
        self.vision_tower.eval()
        self.is_loaded = True

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Features of layer ``select_layer``: ``[B,3,H,W] -> [B,N,C]``; a list of ``[3,H,W]`` -> a list of ``[1,N,C]``.

        The input is cast to the tower's device and dtype; the output comes back in the input's dtype.
        """
        if isinstance(images, (list, tuple)):
            return [self._features(image.unsqueeze(0)) for image in images]
        return self._features(images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        # One parameter lookup instead of the model's .device and .dtype (each walks parameters).
        weight = next(self.vision_tower.parameters())
        out = self.vision_tower(
            images.to(device=weight.device, dtype=weight.dtype), output_hidden_states=True
        )
        return out.hidden_states[self.select_layer][:, self._first_token :].to(images.dtype)

    def _loaded(self) -> nn.Module:
        if not self.is_loaded:
            raise RuntimeError(f"{self.vision_tower_name}: weights not loaded yet; call load_model() first")
        return self.vision_tower

    @property
    def dummy_feature(self) -> torch.Tensor:
        """A zero feature ``[1, hidden_size]`` on the tower's device and dtype."""
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self._loaded().dtype

    @property
    def device(self) -> torch.device:
        return self._loaded().device

    @property
    def config(self) -> Any:
        """The backbone's config: the loaded model's, or the one read at construction."""
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_patches_per_side(self) -> int:
        return int(self.config.image_size) // int(self.config.patch_size)

    @property
    def num_patches(self) -> int:
        """``(image_size // patch_size) ** 2`` in every select mode, LLaVA's contract
        (haotian-liu/LLaVA llava/model/multimodal_encoder/clip_encoder.py:86-88): code that sizes
        buffers from it gets what LLaVA's own tower reports. ``tokens_per_image`` counts a kept CLS."""
        return self.num_patches_per_side**2

    @property
    def tokens_per_image(self) -> int:
        """Tokens per image that ``forward`` returns (patches, plus CLS for "cls_patch")."""
        return self.num_patches_per_side**2 + (self._prefix_tokens - self._first_token)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def has_cls_token(self) -> bool:
        """Whether the backbone's token sequence starts with a CLS token."""
        return self._prefix_tokens > 0

    @property
    def tower_path(self) -> str:
        """The local directory the tower loads from (the ``llm2clip:`` prefix removed)."""
        return str(self._path)
