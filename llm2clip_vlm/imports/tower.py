"""Import a released LLM2CLIP tower (``LLM2CLIP-Openai-L-14-336`` and its -224 / B-16 siblings).

The released directory (hub layout, loaded upstream only with ``trust_remote_code``) holds
``config.json`` (``model_type: clip``, ``architectures: [LLM2CLIPModel]``, a ``vision_config`` and
``projection_dim``) and ``model.safetensors`` with

- ``vision_model.*``: a transformers ``CLIPVisionTransformer`` (same names as ``CLIPVisionModel``);
- ``visual_projection.weight``: the image head ``[projection_dim, hidden]`` (no bias);
- the text adaptor: ``{P}{i}.fn.0`` / ``{P}{i}.fn.3`` / ``{P}{i}.ln`` for the residual blocks,
  ``{P}{n}`` (LayerNorm) and ``{P}{n+1}`` (Linear with bias), i.e. the reference ``TextProj``'s
  ``nn.Sequential`` (microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py:217-246``). The prefix ``{P}``
  is found from the tensors (it could not be confirmed offline; see docs/DATA.md);
- ``logit_scale``.

Written to ``OUT``::

    OUT/tower/   CLIPVisionModel + CLIPImageProcessor (plain transformers, LLaVA-1.5 by path)
    OUT/model/   LLM2CLIP stage-2 checkpoint (image head, text adaptor, logit scale, vision/)

Every source tensor must be used exactly once; the written files are read back and compared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm.identity import file_sha256
from llm2clip_vlm.imports.adaptor_map import (
    DTYPES,
    MODEL_DIR,
    PROVENANCE_FILE,
    TOWER_DIR,
    adaptor_state,
    find_adaptor,
)
from llm2clip_vlm.imports.checkpoint import (
    ImportRefused,
    expect_shape,
    load_tensors,
    read_json,
    safetensors_files,
)
from llm2clip_vlm.imports.released_families import import_released_family
from llm2clip_vlm.imports.tower_layouts import detect_layout
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.vision.backbones import CLIP_MEAN, CLIP_STD
from llm2clip_vlm.vision.config import VisionBackboneConfig
from llm2clip_vlm.vision.model import LLM2CLIP, LLM2CLIPConfig

log = get_logger(__name__)

ARCHITECTURE = "LLM2CLIPModel"
VISION_PREFIX = "vision_model."
IMAGE_HEAD = "visual_projection.weight"
LOGIT_SCALE = "logit_scale"


def _vision_config(cfg: dict[str, Any], state: dict[str, torch.Tensor], where: Path, cfg_file: Path) -> Any:
    from transformers import CLIPVisionConfig

    vc = dict(cfg["vision_config"])
    for volatile in (
        "model_type",
        "architectures",
        "transformers_version",
        "_name_or_path",
        "torch_dtype",
        "dtype",
    ):
        vc.pop(volatile, None)
    config = CLIPVisionConfig(**vc)
    pos_name = f"{VISION_PREFIX}embeddings.position_embedding.weight"
    if pos_name not in state or state[pos_name].ndim != 2:
        raise ImportRefused(f"{where}: tensor {pos_name!r} is missing or not 2-d")
    pos = state[pos_name]
    side = math.isqrt(int(pos.shape[0]) - 1)
    if side * side + 1 != int(pos.shape[0]):
        raise ImportRefused(f"{where}: position embedding has {pos.shape[0]} rows, not a square grid + CLS")
    size = side * int(config.patch_size)
    if "image_size" in vc and int(vc["image_size"]) != size:
        raise ImportRefused(
            f"{cfg_file}: vision_config.image_size {vc['image_size']} but the position "
            f"embedding is for {size} px ({side}x{side} patches of {config.patch_size})"
        )
    config.image_size = size  # the -224 release's config leaves it at the default; the weights decide
    return config


def import_tower(
    src: str | Path, out: str | Path, dtype: str | None = None, num_heads: int | None = None
) -> dict[str, Any]:
    """Convert a released LLM2CLIP tower directory ``src`` into ``out`` (see module doc).

    Args:
        src: the downloaded release (``config.json`` + ``model.safetensors``).
        out: output directory (gets ``tower/`` and ``model/``).
        dtype: ``fp32``/``bf16``/``fp16`` for the written tower (default: as released).
        num_heads: attention heads of an EVA02/SigLIP2 tower (default: the released towers' 16;
            the tensors do not say).

    Returns:
        A summary: paths, sizes, the adaptor prefix, tensor counts.

    Raises:
        ImportRefused: the directory is not in the expected layout (names the key or tensor).
    """
    from transformers import CLIPImageProcessor, CLIPVisionModel

    src, out = Path(src), Path(out)
    cfg_file = src / "config.json"
    cfg = read_json(cfg_file)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    files = safetensors_files(src)
    state = load_tensors(files)
    where = files[0] if len(files) == 1 else src
    # The EVA02 and SigLIP2 releases are recognised by their tensors (their config.json is remote code's).
    layout = detect_layout(state, where)
    if layout is not None:
        return import_released_family(src, out, files, state, layout, dtype, num_heads)
    if cfg.get("model_type") != "clip" or not isinstance(cfg.get("vision_config"), dict):
        raise ImportRefused(
            f"{cfg_file}: model_type {cfg.get('model_type')!r} and no known vision tower in {where} "
            "(known: LLM2CLIP-Openai-* (model_type 'clip', 'vision_model.*'), EVA02-L-14-336 "
            "('<prefix>blocks.0.mlp.w1.weight' as eva_vit_model.py, or "
            "'<prefix>encoder.layers.0.mlp.fc3.weight' as the hub's modeling_evaclip.py), "
            "SigLIP2 so400m (timm names, '<prefix>attn_pool.latent'))"
        )
    arch = cfg.get("architectures")
    if arch != [ARCHITECTURE]:
        raise ImportRefused(f"{cfg_file}: architectures {arch!r}, expected [{ARCHITECTURE!r}]")

    vision_cfg = _vision_config(cfg, state, where, cfg_file)
    vision = {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    tower = CLIPVisionModel(vision_cfg).eval()
    # transformers 5 flattened CLIPVisionModel (no .vision_model); 4.x nests it. Same tensor names.
    inner = getattr(tower, "vision_model", tower)
    expected = set(inner.state_dict())
    missing, unexpected = sorted(expected - set(vision)), sorted(set(vision) - expected)
    if missing or unexpected:
        what = (
            f"missing {VISION_PREFIX}{missing[0]}"
            if missing
            else f"unexpected {VISION_PREFIX}{unexpected[0]}"
        )
        raise ImportRefused(
            f"{where}: vision tensors do not match a CLIPVisionModel built from config.json ({what}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected)"
        )
    for name, t in inner.state_dict().items():
        if tuple(t.shape) != tuple(vision[name].shape):
            raise ImportRefused(
                f"{where}: tensor {VISION_PREFIX}{name!r} has shape {tuple(vision[name].shape)}, "
                f"config.json implies {tuple(t.shape)}"
            )
    inner.load_state_dict(vision, strict=True)

    hidden = int(vision_cfg.hidden_size)
    prefix, blocks = find_adaptor(state, where)
    adaptor, adaptor_names, text_dim, embed_dim = adaptor_state(state, prefix, blocks, where)
    head = expect_shape(state, IMAGE_HEAD, (embed_dim, hidden), where)
    projection_dim = cfg.get("projection_dim")
    if projection_dim is not None and int(projection_dim) != embed_dim:
        raise ImportRefused(
            f"{cfg_file}: projection_dim {projection_dim} but the adaptor/head output {embed_dim}"
        )
    used = {IMAGE_HEAD, *adaptor_names, *(VISION_PREFIX + k for k in vision)}
    if LOGIT_SCALE in state:
        if state[LOGIT_SCALE].numel() != 1:
            raise ImportRefused(
                f"{where}: tensor 'logit_scale' has shape {tuple(state[LOGIT_SCALE].shape)}, expected a scalar"
            )
        used.add(LOGIT_SCALE)
    else:
        log.warning("%s: no logit_scale; the stage-2 checkpoint starts it at ln(1/0.07)", where)
    leftover = sorted(set(state) - used)
    if leftover:
        raise ImportRefused(
            f"{where}: tensor {leftover[0]!r} is not part of the known layout ({len(leftover)} unknown tensors); "
            "refusing to drop weights silently"
        )

    # -- write the tower: plain transformers, loadable by LLaVA-1.5 from its path -----------------
    tower_dir, model_dir = out / TOWER_DIR, out / MODEL_DIR
    target = DTYPES[dtype] if dtype else next(iter(vision.values())).dtype
    tower.to(target).save_pretrained(tower_dir)
    size = int(vision_cfg.image_size)
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(tower_dir)

    # -- the stage-2 checkpoint: our LLM2CLIP with the released head, adaptor and scale ----------
    model_cfg = LLM2CLIPConfig(
        backbone=VisionBackboneConfig(kind="clip", name_or_path=str(tower_dir)),
        text_dim=text_dim,
        embed_dim=embed_dim,
        adaptor_blocks=blocks,
        loss="clip",
    )
    model = LLM2CLIP(model_cfg)
    with torch.no_grad():
        model.image_head.weight.copy_(head.float())
        model.text_adaptor.load_state_dict({k: v.float() for k, v in adaptor.items()}, strict=True)
        if LOGIT_SCALE in state:
            model.logit_scale.copy_(state[LOGIT_SCALE].float().reshape(()))
    model.save_pretrained(model_dir)

    _verify(tower_dir, model_dir, vision, head, adaptor, state.get(LOGIT_SCALE), target)
    summary = {
        "source": str(src.resolve()),
        "source_files": {f.name: file_sha256(f) for f in files},
        "tower": str(tower_dir),
        "model": str(model_dir),
        "image_size": size,
        "patch_size": int(vision_cfg.patch_size),
        "hidden_size": hidden,
        "text_dim": text_dim,
        "embed_dim": embed_dim,
        "adaptor_prefix": prefix,
        "adaptor_blocks": blocks,
        "tensors": len(state),
        "dtype": str(target).replace("torch.", ""),
    }
    (tower_dir / PROVENANCE_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("imported %s: tower %s (%d px), stage-2 checkpoint %s", src, tower_dir, size, model_dir)
    return summary


@torch.no_grad()
def _verify(
    tower_dir: Path,
    model_dir: Path,
    vision: dict[str, torch.Tensor],
    head: torch.Tensor,
    adaptor: dict[str, torch.Tensor],
    logit_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> None:
    """Read the written files back (plain transformers for the tower) and compare every tensor."""
    from transformers import CLIPVisionModel

    reloaded = CLIPVisionModel.from_pretrained(tower_dir)
    loaded = getattr(reloaded, "vision_model", reloaded).state_dict()
    for name, t in vision.items():
        if not torch.equal(loaded[name], t.to(dtype)):
            raise RuntimeError(f"{tower_dir}: tensor {name} differs after writing")
    model = LLM2CLIP.from_pretrained(model_dir)
    if not torch.equal(model.image_head.weight, head.float()):
        raise RuntimeError(f"{model_dir}: the image head differs after writing")
    for name, t in model.text_adaptor.state_dict().items():
        if not torch.equal(t, adaptor[name].float()):
            raise RuntimeError(f"{model_dir}: adaptor tensor {name} differs after writing")
    if logit_scale is not None and float(model.logit_scale) != float(logit_scale.float()):
        raise RuntimeError(f"{model_dir}: logit_scale differs after writing")
