"""Import the released EVA02 and SigLIP2 LLM2CLIP towers (tensors and JSON only).

``LLM2CLIP-EVA02-L-14-336`` / ``LLM2CLIP-Llama-3.2-1B-EVA02-L-14-336`` and
``LLM2CLIP-Llama3.1-8B-siglip2-so400m-patch14-224`` hold, in ``model.safetensors``, one vision tower
(found from its tensor names, under whatever prefix the release used: ``visual.`` in the
reference's ``CLIP``/``CustomCLIP``, ``visual.trunk.`` for a timm trunk), the reference
``TextProj`` text adaptor, ``logit_scale`` and, for the sigmoid-loss tower, ``logit_bias``. The key
maps are in :mod:`llm2clip_vlm.imports.tower_layouts`. Written to ``OUT``::

    OUT/tower/   EVA02: timm hub format (config.json with architecture eva02_large_patch14_clip_336,
                 model.safetensors) + CLIP preprocessor, loaded by LLM2CLIPVisionTower via timm;
                 SigLIP2: a plain transformers SiglipVisionModel + SiglipImageProcessor.
    OUT/heads/   heads.safetensors (image_head.* for EVA's Linear+bias head, text_adaptor.* in our
                 TextAdaptor names, logit_scale, logit_bias) + heads.json (sizes, loss, head kind).

Both also get ``OUT/model/``, our stage-2 checkpoint (``LLM2CLIP.from_pretrained``, ``export-tower``):

- SigLIP2: ``siglip`` backbone; the reference has no image projection, so our Linear head is
  written as the identity, the same map.
- EVA02: ``timm`` backbone (``vision/`` = a copy of ``OUT/tower``), ``image_head: linear_bias``
  holding the released ``head`` (weight and bias), the adaptor and ``logit_scale``. Building a
  timm backbone needs timm, which is optional (and not importable on the CPU machines: it needs
  torchvision). So the checkpoint is written from its parts without building the backbone: the
  head tensors go through an ``LLM2CLIP`` whose vision module is a placeholder of the tower's
  width (strict loads fix their names and shapes as ``LLM2CLIP`` has them), and are read back and
  compared. Loading the checkpoint (``LLM2CLIP.from_pretrained``) needs timm.
"""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm2clip_vlm.identity import file_sha256
from llm2clip_vlm.imports.adaptor_map import (
    DTYPES,
    MODEL_DIR,
    PROVENANCE_FILE,
    TOWER_DIR,
    adaptor_state,
    find_adaptor,
)
from llm2clip_vlm.imports.checkpoint import ImportRefused
from llm2clip_vlm.imports.tower_layouts import (
    EVA_ARCH,
    SIGLIP_ARCH,
    VisionLayout,
    eva_hf_to_native,
    eva_hub_name,
    eva_to_timm,
    siglip_to_hf,
)
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.vision.backbones import CLIP_MEAN, CLIP_STD, VisionBackbone
from llm2clip_vlm.vision.config import VisionBackboneConfig
from llm2clip_vlm.vision.model import LLM2CLIP, VISION_DIR, WEIGHTS_FILE, LLM2CLIPConfig, write_checkpoint

log = get_logger(__name__)

HEADS_DIR = "heads"
HEADS_FILE, HEADS_JSON = "heads.safetensors", "heads.json"
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]  # timm vit siglip _cfg: IMAGENET_INCEPTION_MEAN/STD


def import_released_family(
    src: Path,
    out: Path,
    files: list[Path],
    state: dict[str, torch.Tensor],
    layout: VisionLayout,
    dtype: str | None,
    num_heads: int | None,
) -> dict[str, Any]:
    """Convert an EVA02 or SigLIP2 release (already read into ``state``) into ``out``.

    Raises:
        ImportRefused: a tensor is missing, misshapen or left over (named).
    """
    where = files[0] if len(files) == 1 else src
    head: dict[str, torch.Tensor] = {}
    if layout.family == "eva02_hf":
        # The hub's modeling_evaclip.py names: renamed to eva_vit_model.py's, then mapped as those.
        native, back = eva_hf_to_native(state, layout, where)
        inner = VisionLayout("eva02", "visual.")
        try:
            vision, args, head = eva_to_timm(native, inner, where, num_heads)
        except ImportRefused as e:
            raise ImportRefused(_hub_names(str(e), back, layout.prefix)) from e
        layout.used |= set(back.values())
        layout.family = "eva02"
        size = int(args.get("img_size", 336))
        hidden, patch = int(vision["cls_token"].shape[-1]), int(vision["patch_embed.proj.weight"].shape[-1])
    elif layout.family == "eva02":
        vision, args, head = eva_to_timm(state, layout, where, num_heads)
        hidden, size = int(vision["cls_token"].shape[-1]), int(args.get("img_size", 336))
        patch = int(vision["patch_embed.proj.weight"].shape[-1])
    else:
        vision, siglip_cfg = siglip_to_hf(state, layout, where, num_heads)
        hidden, size, patch = (int(siglip_cfg[k]) for k in ("hidden_size", "image_size", "patch_size"))

    prefix, blocks = find_adaptor(state, where)
    adaptor, adaptor_names, text_dim, embed_dim = adaptor_state(state, prefix, blocks, where)
    used = set(layout.used) | set(adaptor_names)
    if head and int(head["weight"].shape[0]) != embed_dim:
        raise ImportRefused(
            f"{where}: image head {layout.prefix}head.weight outputs {head['weight'].shape[0]}, "
            f"the adaptor {embed_dim}"
        )
    if not head and hidden != embed_dim:
        raise ImportRefused(
            f"{where}: no image head (timm_proj 'none') but the tower width {hidden} differs from "
            f"the adaptor's output {embed_dim}"
        )
    scalars = {}
    for name in ("logit_scale", "logit_bias"):
        if name in state:
            if state[name].numel() != 1:
                raise ImportRefused(
                    f"{where}: tensor {name!r} has shape {tuple(state[name].shape)}, expected a scalar"
                )
            scalars[name] = state[name].float().reshape(())
            used.add(name)
    leftover = sorted(set(state) - used)
    if leftover:
        raise ImportRefused(
            f"{where}: tensor {leftover[0]!r} is not part of the known layout ({len(leftover)} unknown tensors); "
            "refusing to drop weights silently"
        )

    target = DTYPES[dtype] if dtype else next(iter(vision.values())).dtype
    vision = {k: v.to(target).contiguous() for k, v in vision.items()}
    tower_dir, heads_dir = out / TOWER_DIR, out / HEADS_DIR
    tower_dir.mkdir(parents=True, exist_ok=True)
    if layout.family == "eva02":
        _write_timm_eva(tower_dir, vision, args, size)
    else:
        _write_siglip(tower_dir, vision, siglip_cfg, target)

    heads = {f"text_adaptor.{k}": v.float().contiguous() for k, v in adaptor.items()}
    heads |= {f"image_head.{k}": v.float().contiguous() for k, v in head.items()}
    heads |= scalars
    heads_dir.mkdir(parents=True, exist_ok=True)
    save_file(heads, str(heads_dir / HEADS_FILE), metadata={"format": "pt"})
    loss = "siglip" if "logit_bias" in scalars else "clip"
    info = {
        "text_dim": text_dim,
        "embed_dim": embed_dim,
        "adaptor_blocks": blocks,
        "image_head": ("linear_bias" if "bias" in head else "linear") if head else "none",
        "loss": loss,
    }
    (heads_dir / HEADS_JSON).write_text(json.dumps(info, indent=2) + "\n")
    _verify(tower_dir, heads_dir, vision, heads, layout.family)
    if layout.family == "siglip":
        model_dir = _write_siglip_stage2(
            out / MODEL_DIR, tower_dir, adaptor, blocks, text_dim, embed_dim, scalars
        )
    else:
        model_dir = _write_eva_stage2(
            out / MODEL_DIR, tower_dir, hidden, head, adaptor, blocks, text_dim, embed_dim, scalars
        )

    summary = {
        "source": str(src.resolve()),
        "source_files": {f.name: file_sha256(f) for f in files},
        "family": layout.family,
        "vision_prefix": layout.prefix,
        "tower": str(tower_dir),
        "tower_format": f"timm {EVA_ARCH}" if layout.family == "eva02" else "transformers SiglipVisionModel",
        "heads": str(heads_dir),
        "model": str(model_dir),
        "image_size": size,
        "patch_size": patch,
        "hidden_size": hidden,
        "adaptor_prefix": prefix,
        "tensors": len(state),
        "dtype": str(target).replace("torch.", ""),
        **info,
    }
    (tower_dir / PROVENANCE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "imported %s (%s): tower %s (%d px), heads %s, stage-2 checkpoint %s",
        src, layout.family, tower_dir, size, heads_dir, model_dir,
    )  # fmt: skip
    return summary


@torch.no_grad()
def _write_siglip_stage2(
    model_dir: Path,
    tower_dir: Path,
    adaptor: dict[str, torch.Tensor],
    blocks: int,
    text_dim: int,
    embed_dim: int,
    scalars: dict[str, torch.Tensor],
) -> Path:
    """The SigLIP2 release as our stage-2 checkpoint: the SiglipVisionModel tower (pooled by its MAP
    head), the adaptor, logit scale and bias. The reference has no image projection
    (``timm_proj: none``); our image head is a Linear, set to the identity, which is the same map."""
    model = LLM2CLIP(
        LLM2CLIPConfig(
            backbone=VisionBackboneConfig(kind="siglip", name_or_path=str(tower_dir)),
            text_dim=text_dim,
            embed_dim=embed_dim,
            adaptor_blocks=blocks,
            loss="siglip" if "logit_bias" in scalars else "clip",
        )
    )
    model.image_head.weight.copy_(torch.eye(embed_dim))
    model.text_adaptor.load_state_dict({k: v.float() for k, v in adaptor.items()}, strict=True)
    if "logit_scale" in scalars:
        model.logit_scale.copy_(scalars["logit_scale"])
    if model.logit_bias is not None:
        model.logit_bias.copy_(scalars["logit_bias"])
    model.save_pretrained(model_dir)
    return model_dir


@torch.no_grad()
def _write_eva_stage2(
    model_dir: Path,
    tower_dir: Path,
    hidden: int,
    head: dict[str, torch.Tensor],
    adaptor: dict[str, torch.Tensor],
    blocks: int,
    text_dim: int,
    embed_dim: int,
    scalars: dict[str, torch.Tensor],
) -> Path:
    """The EVA02 release as our stage-2 checkpoint, written without building the timm backbone.

    ``vision/`` is a byte copy of the timm tower just written and verified; the head state comes
    from an ``LLM2CLIP`` (``image_head: linear_bias``) whose vision module is only a placeholder of
    the tower's width, never saved: timm is needed to build the real one and is optional. The
    written head tensors are read back and compared; the backbone itself is checked by names and
    shapes only here (``_verify`` and the tower tests), loading it needs timm.
    """
    config = LLM2CLIPConfig(
        backbone=VisionBackboneConfig(kind="timm", name_or_path=str(tower_dir)),
        text_dim=text_dim,
        embed_dim=embed_dim,
        image_head="linear_bias",
        adaptor_blocks=blocks,
        loss="clip",
    )
    placeholder = VisionBackbone(nn.Identity(), None, hidden, 0)
    model = LLM2CLIP(config, backbone=placeholder)
    # Strict loads: a name or shape that LLM2CLIP would not have is refused here, not at load time.
    model.image_head.load_state_dict({k: v.float() for k, v in head.items()}, strict=True)
    model.text_adaptor.load_state_dict({k: v.float() for k, v in adaptor.items()}, strict=True)
    if "logit_scale" in scalars:
        model.logit_scale.copy_(scalars["logit_scale"])
    state = model.head_state_dict()
    needed = sum(v.nbytes for v in state.values()) + sum(f.stat().st_size for f in tower_dir.iterdir())
    write_checkpoint(
        model_dir, config, state, lambda p: shutil.copytree(tower_dir, p, dirs_exist_ok=True), needed
    )
    back = load_file(str(model_dir / WEIGHTS_FILE))
    if set(back) != set(state) or not all(torch.equal(back[k], v) for k, v in state.items()):
        raise RuntimeError(f"{model_dir / WEIGHTS_FILE}: the head tensors differ after writing")
    for f in tower_dir.iterdir():
        if not filecmp.cmp(f, model_dir / VISION_DIR / f.name, shallow=False):
            raise RuntimeError(f"{model_dir / VISION_DIR / f.name} differs from {f} after copying")
    return model_dir


def _hub_names(message: str, back: dict[str, str], prefix: str) -> str:
    """A refusal about renamed tensors, with the names as the release spells them."""
    return re.sub(
        r"'(visual\.[^']+)'",
        lambda m: repr(back.get(m.group(1)) or eva_hub_name(m.group(1), prefix)),
        message,
    )


def _write_timm_eva(
    tower_dir: Path, vision: dict[str, torch.Tensor], args: dict[str, Any], size: int
) -> None:
    """timm's hub format (timm/models/_hub.py save_config: architecture, num_classes, num_features,
    global_pool, model_args, pretrained_cfg) + a CLIP processor as EVA-CLIP's transform
    (Resize(size, bicubic), CenterCrop, OpenAI mean/std)."""
    from transformers import CLIPImageProcessor

    config = {
        "architecture": EVA_ARCH,
        "num_classes": 0,
        "num_features": int(vision["cls_token"].shape[-1]),
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": CLIP_MEAN,
            "std": CLIP_STD,
            "num_classes": 0,
        },
    }
    (tower_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(vision, str(tower_dir / "model.safetensors"), metadata={"format": "pt"})
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(tower_dir)


def _write_siglip(
    tower_dir: Path, vision: dict[str, torch.Tensor], cfg: dict[str, Any], dtype: torch.dtype
) -> None:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(**cfg)).eval()
    inner = getattr(model, "vision_model", model)  # transformers 4.x nests it; 5.x does not
    inner.load_state_dict({k: v.float() for k, v in vision.items()}, strict=True)
    model.to(dtype).save_pretrained(tower_dir)
    size = int(cfg["image_size"])
    # timm's siglip cfg: bicubic, mean/std 0.5, the whole image resized to size x size.
    SiglipImageProcessor(
        size={"height": size, "width": size}, resample=3, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
    ).save_pretrained(tower_dir)


def _verify(
    tower_dir: Path,
    heads_dir: Path,
    vision: dict[str, torch.Tensor],
    heads: dict[str, torch.Tensor],
    family: str,
) -> None:
    """Read the written tensors back (SigLIP through plain transformers) and compare each one."""
    if family == "siglip":
        from transformers import SiglipVisionModel

        reloaded = SiglipVisionModel.from_pretrained(tower_dir, local_files_only=True)
        written = getattr(reloaded, "vision_model", reloaded).state_dict()
    else:
        written = load_file(str(tower_dir / "model.safetensors"))
    if not set(vision) <= set(written):
        raise RuntimeError(f"{tower_dir}: written tensor names differ from the converted ones")
    for name, t in vision.items():
        if not torch.equal(written[name], t):
            raise RuntimeError(f"{tower_dir}: tensor {name} differs after writing")
    back = load_file(str(heads_dir / HEADS_FILE))
    for name, t in heads.items():
        if not torch.equal(back[name], t):
            raise RuntimeError(f"{heads_dir}: tensor {name} differs after writing")


__all__ = ["HEADS_DIR", "HEADS_FILE", "HEADS_JSON", "SIGLIP_ARCH", "import_released_family"]
