"""Vision backbones of stage 2: one registry, one surface for every encoder family.

``create_backbone(cfg)`` builds a :class:`VisionBackbone` from a :class:`VisionBackboneConfig`:

- ``clip``   transformers ``CLIPVisionModel`` (OpenAI CLIP, also the vision half of a full CLIP
  checkpoint; its text tower and projection are dropped at load time),
- ``siglip`` transformers ``SiglipVisionModel`` (SigLIP and the fixed-resolution SigLIP2),
- ``timm``   any timm ViT (EVA02 and others); timm is an optional dependency, imported here only.

Every backbone returns pooled features ``[B, hidden_size]`` (the encoder's own pooling: CLIP's
post-layernormed CLS token, SigLIP's attention-pooling head, timm's ``pre_logits``), exposes its
blocks for layer-wise lr decay, switches gradient checkpointing, carries a CLIP-compatible image
processor and saves itself in its own format, so the exported tower needs no code of ours.

``name_or_path: ""`` builds a small random ViT from the config's sizes (the CPU demo and tests).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip_vlm.errors import MissingDependencyError
from llm2clip_vlm.vision.config import VisionBackboneConfig
from llm2clip_vlm.weights import check_model_files, from_pretrained_kwargs, loading, require_safetensors

# OpenAI CLIP's normalisation; SigLIP uses 0.5/0.5 (its processor's own default).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class VisionBackbone(nn.Module):
    """Common surface of every registered vision encoder.

    Subclasses set ``self.model`` (the wrapped encoder) and ``self.image_processor`` and implement
    :meth:`forward`, :meth:`layer_ids`, :meth:`set_grad_checkpointing` and :meth:`save_pretrained`.
    """

    kind: str = ""

    def __init__(self, model: nn.Module, image_processor: Any, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.image_processor = image_processor
        self.hidden_size = hidden_size
        self.num_layers = num_layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Pooled features ``[B, hidden_size]``."""
        raise NotImplementedError

    def layer_ids(self) -> dict[str, int]:  # pragma: no cover - abstract
        """Layer index of every parameter (names relative to this module).

        0 = the stem (patch/position embeddings, pre-norm), ``i + 1`` = transformer block ``i``,
        ``num_layers + 1`` = everything after the last block (final norm, pooling head). Layer-wise
        lr decay scales layer ``l`` by ``decay ** (num_layers + 1 - l)``.
        """
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fsdp_blocks(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The transformer blocks, each one FSDP unit (the wrapping policy's hook)."""
        raise NotImplementedError

    def save_pretrained(self, path: str | Path) -> Path:  # pragma: no cover - abstract
        """Write the encoder and its image processor in the family's own format."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        crop = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        return int(crop.get("height") or crop.get("shortest_edge"))


# A factory gets the config and whether pickled weights (pytorch_model.bin) may be loaded.
Factory = Callable[[VisionBackboneConfig, bool], VisionBackbone]
_REGISTRY: dict[str, Factory] = {}


def register_backbone(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register a factory ``(VisionBackboneConfig, allow_pickle) -> VisionBackbone``."""

    def wrap(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"vision backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def known_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(cfg: VisionBackboneConfig, *, allow_pickle: bool = False) -> VisionBackbone:
    """Build the backbone ``cfg.kind`` (pretrained from ``cfg.name_or_path``, or random when empty).

    Args:
        cfg: family, weights and (random ViT) sizes.
        allow_pickle: accept a directory whose weights are only pickles (``pytorch_model.bin``);
            refused by default (``reliability.allow_pickle_weights``).

    Raises:
        ValueError: unknown kind (the message lists the registered ones).
        PickleRefusedError: pickle-only weights without ``allow_pickle``.
    """
    if cfg.kind not in _REGISTRY:
        raise ValueError(f"unknown vision backbone {cfg.kind!r}; known: {', '.join(known_backbones())}")
    if cfg.name_or_path:
        require_safetensors(cfg.name_or_path, allow_pickle, what=f"vision backbone ({cfg.kind})")
    return _REGISTRY[cfg.kind](cfg, allow_pickle)


def backbone_from_config(kind: str, config: Any) -> VisionBackbone:
    """A random-weight backbone of family ``kind`` with the architecture of ``config``, no files.

    ``config`` is the family's transformers vision config (``clip``, ``siglip``) or a timm model
    name (``timm``). Built on the current default device: under ``torch.device("meta")`` nothing
    is allocated, which is how ``plan`` and the full-size recipe tests build a ViT-L/14-336 in
    milliseconds. The random-ViT branch of :func:`create_backbone` builds through here too.
    """
    if kind == "clip":
        from transformers import CLIPImageProcessor, CLIPVisionModel

        s = int(config.image_size)
        processor = CLIPImageProcessor(
            size={"shortest_edge": s},
            crop_size={"height": s, "width": s},
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
        model = CLIPVisionModel(config)
        return CLIPBackbone(model, processor, config.hidden_size, config.num_hidden_layers)
    if kind == "siglip":
        from transformers import SiglipImageProcessor, SiglipVisionModel

        s = int(config.image_size)
        model = SiglipVisionModel(config)
        processor = SiglipImageProcessor(size={"height": s, "width": s})
        return SiglipBackbone(model, processor, config.hidden_size, config.num_hidden_layers)
    if kind == "timm":
        timm = _import_timm()
        model = timm.create_model(str(config), pretrained=False, num_classes=0)
        return _timm_backbone(model)
    raise ValueError(f"unknown vision backbone {kind!r}; known: {', '.join(known_backbones())}")


# -- transformers families ----------------------------------------------------------------------


class HFVisionBackbone(VisionBackbone):
    """A transformers vision model with ``embeddings``, ``encoder.layers`` and a pooled output."""

    # Submodules that run before block 0 (layer id 0); the family decides, not a name search.
    stem_modules: tuple[str, ...] = ("embeddings",)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output

    def layer_ids(self) -> dict[str, int]:
        ids: dict[str, int] = {}
        for stem in self.stem_modules:
            for name, _ in getattr(self.model, stem).named_parameters():
                ids[f"model.{stem}.{name}"] = 0
        for i, block in enumerate(self.model.encoder.layers):
            for name, _ in block.named_parameters():
                ids[f"model.encoder.layers.{i}.{name}"] = i + 1
        for name, _ in self.named_parameters():
            ids.setdefault(name, self.num_layers + 1)
        return ids

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            # Non-reentrant: works with DDP/FSDP and with inputs that do not require grad.
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        else:
            self.model.activation_checkpointing_disable()

    def fsdp_blocks(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        return path


class CLIPBackbone(HFVisionBackbone):
    kind = "clip"
    stem_modules = ("embeddings",)

    def layer_ids(self) -> dict[str, int]:
        """As the reference's name rules (microsoft/LLM2CLIP llm2clip/training/optim.py:18-45,
        ``get_num_layer_for_transformer``) place OpenAI's ViT: ``conv1`` and
        ``positional_embedding`` are layer 0, ``class_embedding`` and ``ln_pre`` match no rule
        and get the last id (the full rate), like ``ln_post`` and ``proj``."""
        ids = super().layer_ids()
        top = self.num_layers + 1
        ids["model.embeddings.class_embedding"] = top
        for name, _ in self.model.pre_layrnorm.named_parameters():
            ids[f"model.pre_layrnorm.{name}"] = top
        return ids


class SiglipBackbone(HFVisionBackbone):
    kind = "siglip"


def _random_sizes(cfg: VisionBackboneConfig) -> dict[str, int]:
    return {
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
    }


@register_backbone("clip")
def _create_clip(cfg: VisionBackboneConfig, allow_pickle: bool) -> VisionBackbone:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if cfg.name_or_path:
        # fp32 master weights; mixed precision is the trainer's autocast.
        check_model_files(cfg.name_or_path, "vision backbone")
        with loading(cfg.name_or_path, "vision backbone"):
            model = CLIPVisionModel.from_pretrained(
                cfg.name_or_path, dtype=torch.float32, **from_pretrained_kwargs(allow_pickle)
            )
            processor = CLIPImageProcessor.from_pretrained(cfg.name_or_path)
    else:
        return backbone_from_config("clip", CLIPVisionConfig(**_random_sizes(cfg)))
    c = model.config
    return CLIPBackbone(model, processor, c.hidden_size, c.num_hidden_layers)


@register_backbone("siglip")
def _create_siglip(cfg: VisionBackboneConfig, allow_pickle: bool) -> VisionBackbone:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    if cfg.name_or_path:
        check_model_files(cfg.name_or_path, "vision backbone")
        with loading(cfg.name_or_path, "vision backbone"):
            model = SiglipVisionModel.from_pretrained(
                cfg.name_or_path, dtype=torch.float32, **from_pretrained_kwargs(allow_pickle)
            )
            processor = SiglipImageProcessor.from_pretrained(cfg.name_or_path)
    else:
        return backbone_from_config("siglip", SiglipVisionConfig(**_random_sizes(cfg)))
    c = model.config
    return SiglipBackbone(model, processor, c.hidden_size, c.num_hidden_layers)


# -- timm (optional) ----------------------------------------------------------------------------


class TimmBackbone(VisionBackbone):
    """A timm ViT (EVA02, ...) with its classifier removed (``num_classes=0``: pooled pre-logits)."""

    kind = "timm"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    def layer_ids(self) -> dict[str, int]:
        from timm.models import group_parameters

        # timm's own fine-grained grouping: stem = 0, block i = i + 1, head/norm last.
        groups = group_parameters(self.model, self.model.group_matcher(coarse=False))
        ids = {f"model.{name}": int(gid) for gid, names in groups.items() for name in names}
        top = max(ids.values(), default=0)
        for name, _ in self.named_parameters():
            ids.setdefault(name, top)
        return ids

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def fsdp_blocks(self) -> list[nn.Module]:
        return list(self.model.blocks)

    def save_pretrained(self, path: str | Path) -> Path:
        from timm.models import save_for_hf

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # timm's hub format (config.json + model.safetensors), loadable with
        # timm.create_model("local-dir:<path>"); the processor lets CLIP-style code preprocess.
        save_for_hf(self.model, str(path), safe_serialization="only")
        self.image_processor.save_pretrained(path)
        return path


@register_backbone("timm")
def _create_timm(cfg: VisionBackboneConfig, allow_pickle: bool) -> VisionBackbone:
    timm = _import_timm()
    if not cfg.name_or_path:
        raise ValueError("vision backbone 'timm' needs name_or_path (a timm model name or a saved dir)")
    name = cfg.name_or_path
    if Path(name).is_dir():
        model = timm.create_model(f"local-dir:{name}", pretrained=True, num_classes=0)
    else:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    return _timm_backbone(model)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as e:
        raise MissingDependencyError(
            "vision backbone 'timm' (e.g. an imported EVA02 tower) needs timm: pip install 'llm2clip-vlm[timm]'"
        ) from e
    return timm


def _timm_backbone(model: nn.Module) -> TimmBackbone:
    """A timm model wrapped with a CLIP-compatible processor from its data config."""
    import timm
    from transformers import CLIPImageProcessor

    data_cfg = timm.data.resolve_data_config({}, model=model)
    _, h, w = data_cfg["input_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": h},
        crop_size={"height": h, "width": w},
        image_mean=list(data_cfg["mean"]),
        image_std=list(data_cfg["std"]),
    )
    num_layers = len(getattr(model, "blocks", []))
    backbone = TimmBackbone(model, processor, model.num_features, num_layers)
    return backbone
