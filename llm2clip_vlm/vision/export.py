"""Export a stage-2 run: the vision tower in its backbone's own format, the retrieval model, a card.

``export_tower(run_dir, out_dir)`` writes

- ``out_dir/``: the stage-2 vision encoder exactly as its family saves itself (for CLIP/SigLIP:
  ``config.json``, ``model.safetensors``, ``preprocessor_config.json``), so unmodified code loads
  it: ``AutoModel.from_pretrained``, ``CLIPVisionModel.from_pretrained``,
  ``AutoImageProcessor.from_pretrained`` (LLaVA-1.5 loads its vision tower exactly this way);
  plus ``README.md`` (hub model card: metadata with a model-index, provenance, metrics; see
  :mod:`llm2clip_vlm.hub.cards`) and ``llm2clip_provenance.json``;
- ``model_dir`` (default ``out_dir/../model``): the full retrieval model
  (``LLM2CLIP.from_pretrained``).

Before returning, the export is reloaded with plain transformers and its pooled features are
compared to the trained model's, so a tower that would load differently is never handed on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm2clip_vlm import config_io, resources
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.training.optim import DTYPES
from llm2clip_vlm.vision.config import ExportConfig, Stage2Config
from llm2clip_vlm.vision.model import LLM2CLIP

log = get_logger(__name__)


def export_tower(
    run_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path | None = None,
    dtype: str | None = None,
    verify: bool = True,
    card: Callable[[dict[str, Any]], str] | None = None,
) -> Path:
    """Export the stage-2 run ``run_dir`` (its ``model/``, ``config.yaml``, ``metrics.json``).

    Args:
        run_dir: a finished stage-2 run directory.
        out_dir: where the tower goes.
        model_dir: where the full retrieval model goes (default: ``out_dir/../model``).
        dtype: ``fp32``/``bf16``/``fp16`` for the tower weights (default: the run's ``export.dtype``).
        verify: reload the tower with plain transformers and compare features to the trained model.
        card: provenance -> the tower's ``README.md`` (none written without it).

    Returns:
        ``out_dir``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model_src = run_dir / "model"
    if not model_src.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a finished stage-2 run (no model/ folder)")
    # The run's config.yaml as plain data: provenance only copies from it (any version of it).
    cfg_file = run_dir / "config.yaml"
    cfg = config_io.read_yaml(cfg_file) if cfg_file.is_file() else {}
    dtype = dtype or cfg.get("export", {}).get("dtype", ExportConfig().dtype)
    if dtype not in DTYPES:
        raise ValueError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    metrics = (
        json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    )

    model = LLM2CLIP.from_pretrained(model_src).eval()
    model_dir = Path(model_dir) if model_dir is not None else out_dir.parent / "model"
    model.save_pretrained(model_dir)

    backbone = model.vision
    reference = _probe_features(backbone) if verify else None
    backbone.model.to(DTYPES[dtype])
    with resources.writing(out_dir, lambda: sum(p.nbytes for p in backbone.model.parameters())):
        backbone.save_pretrained(out_dir)
    backbone.model.to(torch.float32)

    provenance = _provenance(cfg, model, metrics, run_dir, dtype)
    (out_dir / "llm2clip_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if card is not None:  # the hub model card (built by the command layer, which has the run's config)
        (out_dir / "README.md").write_text(card(provenance))
    if verify and reference is not None and backbone.kind in ("clip", "siglip"):
        _verify(out_dir, backbone, reference, dtype)
    log.info("tower written to %s (%s, %s); retrieval model to %s", out_dir, backbone.kind, dtype, model_dir)
    return out_dir


@torch.no_grad()
def _probe_features(backbone: Any) -> tuple[torch.Tensor, torch.Tensor]:
    size = backbone.image_size
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return probe, backbone(probe).float()


@torch.no_grad()
def _verify(out_dir: Path, backbone: Any, reference: tuple[torch.Tensor, torch.Tensor], dtype: str) -> None:
    """Reload with ``AutoModel``/``AutoImageProcessor`` (no code of ours) and compare features."""
    from transformers import AutoImageProcessor, AutoModel

    loaded = AutoModel.from_pretrained(out_dir, dtype=torch.float32).eval()
    AutoImageProcessor.from_pretrained(out_dir)
    probe, expected = reference
    got = loaded(pixel_values=probe).pooler_output.float()
    tol = 1e-4 if dtype == "fp32" else 5e-2
    err = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
    if err > tol:
        raise RuntimeError(f"exported tower at {out_dir} gives different features (relative error {err:.2e})")


def _train_paths(train: Any) -> str:
    """The training data of a config's ``data.train`` (one set, or a list of sets), for the card."""
    sets = train if isinstance(train, list) else [train]
    return " + ".join(str(t.get("path")) for t in sets if t.get("path"))


def _provenance(
    cfg: dict[str, Any], model: LLM2CLIP, metrics: dict[str, Any], run_dir: Path, dtype: str
) -> dict[str, Any]:
    c = model.config
    if "stage2" in metrics:  # a run from before metrics.json schema 1
        s2 = metrics["stage2"]
        retrieval, before, train = (
            s2.get("retrieval", {}),
            s2.get("retrieval_before", {}),
            s2.get("train", {}),
        )
    else:
        retrieval, before = (
            metrics.get("eval", {}).get("after", {}),
            metrics.get("eval", {}).get("before", {}),
        )
        train = {**metrics.get("train", {}), **metrics.get("details", {})}
    stage2 = cfg.get("stage2", config_io.to_dict(Stage2Config()))
    data = cfg.get("data", {})
    return {
        "method": "LLM2CLIP stage 2 (arXiv 2411.04997): vision encoder aligned to a frozen LLM caption embedder",
        "backbone": {
            "kind": c.backbone.kind,
            "init": stage2.get("backbone", {}).get("name_or_path") or "random (demo)",
        },
        "dtype": dtype,
        "caption_encoder": {"path": c.encoder_path, "identity": c.encoder_identity, "dim": c.text_dim},
        "data": {
            "train": _train_paths(data.get("train", {}))
            or f"synthetic demo world (seed {data.get('demo_seed', 0)})",
            "heldout": sorted(retrieval),
        },
        "stage2": stage2,
        "run_dir": str(run_dir.resolve()),
        "retrieval": retrieval,
        "retrieval_before": before,
        "train": {k: v for k, v in train.items() if k != "losses"},
    }
