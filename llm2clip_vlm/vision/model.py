"""``LLM2CLIP``: the stage-2 retrieval model (vision encoder + image head + text adaptor).

Text never runs through the LLM during training: the model takes stored stage-1 caption
embeddings (``text_embeddings``) and the adaptor maps them into the shared space. For use after
training, :meth:`LLM2CLIP.get_text_features` runs the stage-1 :class:`CaptionEncoder` (known by
path, loaded lazily on first use) and then the adaptor.

On disk (``save_pretrained``)::

    llm2clip_config.json   LLM2CLIPConfig (+ format version)
    model.safetensors      image head, text adaptor, logit scale (and bias)
    vision/                the vision backbone in its own format (config.json, model.safetensors,
                           preprocessor_config.json): loadable by plain transformers
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llm2clip_vlm import config_io, resources
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.vision.adaptor import TextAdaptor, new_image_head
from llm2clip_vlm.vision.backbones import VisionBackbone, create_backbone
from llm2clip_vlm.vision.config import Stage2Config, VisionBackboneConfig

CONFIG_FILE = "llm2clip_config.json"
WEIGHTS_FILE = "model.safetensors"
VISION_DIR = "vision"
FORMAT_VERSION = 1


@dataclass
class LLM2CLIPConfig:
    """Everything needed to rebuild an :class:`LLM2CLIP` (written as JSON next to its weights)."""

    backbone: VisionBackboneConfig = field(default_factory=VisionBackboneConfig)
    # Width of the stage-1 caption embeddings (the LLM's hidden size).
    text_dim: int = 4096
    embed_dim: int = 1280
    # The image head: "linear" (no bias, OpenAI CLIP), "linear_bias" (EVA), "none" (SigLIP2).
    image_head: str = "linear"
    adaptor_blocks: int = 4
    loss: str = "clip"
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100)
    logit_bias_init: float = -10.0
    # The stage-1 CaptionEncoder directory and its identity (get_text_features checks it).
    encoder_path: str = ""
    encoder_identity: str = ""


def stage2_model_config(
    s: Stage2Config, text_dim: int, encoder_path: str = "", encoder_identity: str = ""
) -> LLM2CLIPConfig:
    """The :class:`LLM2CLIPConfig` that stage 2 trains for section ``s`` on ``text_dim``-wide
    caption embeddings (the store's width: the stage-1 LLM's hidden size)."""
    return LLM2CLIPConfig(
        backbone=s.backbone, text_dim=text_dim, embed_dim=s.embed_dim, image_head=s.image_head,
        adaptor_blocks=s.adaptor_blocks, loss=s.loss, logit_scale_init=s.logit_scale_init, logit_scale_max=s.logit_scale_max,
        logit_bias_init=s.logit_bias_init, encoder_path=encoder_path, encoder_identity=encoder_identity,
    )  # fmt: skip


class LLM2CLIP(nn.Module):
    """Vision backbone + re-initialised image head + text adaptor + logit scale (+ bias for SigLIP).

    ``forward`` returns open_clip's dict of L2-normalised features and ``exp(logit_scale)``, so the
    losses of :mod:`llm2clip_vlm.training.losses` take it directly.
    """

    def __init__(self, config: LLM2CLIPConfig, backbone: VisionBackbone | None = None) -> None:
        super().__init__()
        self.config = config
        self.vision = backbone if backbone is not None else create_backbone(config.backbone)
        self.image_head = new_image_head(self.vision.hidden_size, config.embed_dim, config.image_head)
        self.text_adaptor = TextAdaptor(config.text_dim, config.embed_dim, config.adaptor_blocks)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        # Only the sigmoid loss uses a bias; an unused parameter would stall DDP's reducer.
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(config.logit_bias_init))) if config.loss == "siglip" else None
        )
        self._encoder: Any = None

    # -- features -------------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``[B, embed_dim]`` (float32)."""
        return F.normalize(self.image_head(self.vision(pixel_values)).float(), dim=-1)

    def get_text_features_from_embeddings(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features ``[N, embed_dim]`` from stage-1 caption embeddings ``[N, text_dim]``."""
        if text_embeddings.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"caption embeddings have width {text_embeddings.shape[-1]}, the adaptor expects "
                f"{self.config.text_dim} (a store from a different LLM?)"
            )
        x = text_embeddings.to(self.logit_scale.device, self.text_adaptor.proj.weight.dtype)
        return F.normalize(self.text_adaptor(x).float(), dim=-1)

    @torch.no_grad()
    def get_text_features(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """L2-normalised text features of raw captions: stage-1 encoder, then the adaptor."""
        emb = self.caption_encoder().encode(list(texts), batch_size=batch_size)
        return self.get_text_features_from_embeddings(emb)

    def forward(
        self, pixel_values: torch.Tensor | None = None, text_embeddings: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Features of either or both sides, plus ``logit_scale`` (and ``logit_bias`` for SigLIP)."""
        out: dict[str, torch.Tensor] = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if pixel_values is not None:
            out["image_features"] = self.get_image_features(pixel_values)
        if text_embeddings is not None:
            out["text_features"] = self.get_text_features_from_embeddings(text_embeddings)
        return out

    def fsdp_blocks(self) -> list[nn.Module]:
        """The FSDP wrapping policy's units: the ViT's blocks and the adaptor's residual blocks (the
        head, norms and logit scale stay with the root)."""
        return [*self.vision.fsdp_blocks(), *self.text_adaptor.blocks]

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep ``logit_scale`` in [0, ln 100] (applied after every optimizer step, as open_clip)."""
        self.logit_scale.clamp_(0, self.config.logit_scale_max)

    # -- the stage-1 encoder ----------------------------------------------------------------------
    def caption_encoder(self) -> Any:
        """The stage-1 CaptionEncoder (loaded on first use from ``config.encoder_path``)."""
        if self._encoder is None:
            if not self.config.encoder_path:
                raise ValueError(
                    "this LLM2CLIP does not know its stage-1 encoder; pass encoder_path to "
                    "from_pretrained, or use get_text_features_from_embeddings"
                )
            enc = CaptionEncoder.from_pretrained(self.config.encoder_path, device=self.logit_scale.device)
            if self.config.encoder_identity and enc.identity() != self.config.encoder_identity:
                raise ValueError(
                    f"caption encoder at {self.config.encoder_path} has identity {enc.identity()[:12]}, "
                    f"but this model was trained on embeddings of {self.config.encoder_identity[:12]}"
                )
            # Not a submodule: the LLM is frozen and saved separately, never in this model's weights.
            object.__setattr__(self, "_encoder", enc)
        return self._encoder

    # -- persistence ----------------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the backbone (the backbone is saved in its own format)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config, head weights (safetensors) and the backbone in its own format to ``path``."""
        needed = sum(p.numel() * p.element_size() for p in self.parameters())
        return write_checkpoint(
            path, self.config, self.head_state_dict(), self.vision.save_pretrained, needed
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, encoder_path: str | None = None) -> LLM2CLIP:
        """Load a model written by :meth:`save_pretrained`.

        Args:
            path: the model directory.
            encoder_path: override the stage-1 encoder location recorded at save time.
        """
        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not an LLM2CLIP model directory (no {CONFIG_FILE})")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
        version = raw.pop("format", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{cfg_file}: format {version!r}, this version reads {FORMAT_VERSION}")
        try:
            config = config_io.build(LLM2CLIPConfig, raw)
        except config_io.ConfigError as e:
            raise ValueError(f"{cfg_file}: {e}") from e
        config.backbone = dataclasses.replace(config.backbone, name_or_path=str(path / VISION_DIR))
        if encoder_path is not None:
            config.encoder_path = str(encoder_path)
        model = cls(config)
        state = load_file(str(path / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("vision.")]
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILE}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model


def write_checkpoint(
    path: str | Path,
    config: LLM2CLIPConfig,
    head_state: dict[str, torch.Tensor],
    write_vision: Callable[[Path], Any],
    needed_bytes: int,
) -> Path:
    """Write the :meth:`LLM2CLIP.save_pretrained` layout from its parts.

    ``write_vision(path / "vision")`` writes the backbone in its own format. :meth:`LLM2CLIP.save_pretrained`
    passes its backbone's ``save_pretrained``; ``import-tower`` passes a copy of an already written
    tower, so an EVA02 (timm) release becomes a checkpoint without building the backbone, which
    would need timm.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with resources.writing(path, needed_bytes):  # a full disk: one line naming the folder and size
        write_vision(path / VISION_DIR)
        state = {k: v.detach().contiguous().cpu() for k, v in head_state.items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    cfg = config_io.to_dict(config)
    cfg["backbone"]["name_or_path"] = VISION_DIR  # relative: the folder can move
    cfg["format"] = FORMAT_VERSION
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return path
