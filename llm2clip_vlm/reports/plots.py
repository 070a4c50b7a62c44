"""The report's figures, drawn with matplotlib (Agg: no display needed) and returned as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from llm2clip_vlm.reports.runs import Run

KIND_TITLES = {
    "stage1": "stage 1 (SimCSE)",
    "stage2": "stage 2 (CLIP)",
    "llava": "LLaVA",
    "train": "training",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window, also where a display exists
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


PANELS = (("loss", "loss", False), ("lr", "learning rate", False), ("grad_norm", "gradient norm", True),
          ("logit_scale", "logit scale", False))  # fmt: skip


def kinds(runs: Sequence[Run]) -> list[str]:
    """The kinds of run present that logged training lines, in pipeline order."""
    return [k for k in KIND_TITLES if any(r.kind == k and r.train for r in runs)]


def training_curves(runs: Sequence[Run], kind: str) -> bytes | None:
    """One row of panels (loss, lr, grad norm, logit scale) for the runs of ``kind``, a line per run."""
    chosen = [r for r in runs if r.kind == kind and r.train]
    panels = [p for p in PANELS if any(r.series(p[0])[0] for r in chosen)]
    if not panels:
        return None
    plt = _pyplot()
    # The same width whatever the panel count, so every figure shows its text at one size.
    fig, axes = plt.subplots(1, len(panels), figsize=(13.0, 2.9), squeeze=False)
    for n, (ax, (key, label, log_y)) in enumerate(zip(axes[0], panels, strict=True)):
        for run in chosen:
            steps, values = run.series(key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=run.label)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if n == 0:
            ax.legend(fontsize=7)
    fig.suptitle(KIND_TITLES[kind], fontsize=11)
    fig.tight_layout()
    return _png(fig)


def before_after_bars(
    labels: Sequence[str], before: Sequence[float], after: Sequence[float], ylabel: str
) -> bytes:
    """Grouped bars: for each label, the value before and after training."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.6, 0.9 * len(labels) + 2), 2.6))
    x = list(range(len(labels)))
    w = 0.38
    b1 = ax.bar([i - w / 2 for i in x], before, w, label="before", color="#b0b7c3")
    b2 = ax.bar([i + w / 2 for i in x], after, w, label="after", color="#2f6fdf")
    ax.bar_label(b1, fmt="%.1f", fontsize=8)
    ax.bar_label(b2, fmt="%.1f", fontsize=8)
    ax.set_xticks(x, labels, rotation=15 if len(labels) > 3 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max([100.0, *before, *after]) * 1.08)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
