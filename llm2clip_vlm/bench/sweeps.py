"""How each cost grows with its work: small sweeps over the tiny presets (figures in docs/BENCHMARKS.md).

    python -m llm2clip_vlm.bench.sweeps embed|stage2|llava [--repeats N]

- ``embed``: pass time vs number of captions (images x 5) and vs caption length (each caption
  repeated k times), length-bucketed;
- ``stage2``: step time of each variant vs global batch size and vs image size;
- ``llava``: step time of each variant vs sequence length.

Each point is one suite run (warm-up 1, then ``--repeats`` timed calls; medians).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from llm2clip_vlm.bench import embed, llava, stage2


def _point(module: Any, preset: Any, repeats: int) -> dict[str, float]:
    module.PRESETS["sweep"] = preset
    try:
        report = module.run("sweep", warmup=1, repeats=repeats)
    finally:
        del module.PRESETS["sweep"]
    return {t.name: round(1e3 * t.median_s, 1) for t in report.timings}


def sweep_embed(repeats: int) -> list[dict[str, Any]]:
    """Embed pass (ms) vs captions and vs caption length."""
    base = embed.PRESETS["tiny"]
    rows = []
    for images in (50, 100, 200):
        p = dataclasses.replace(base, images=images)
        rows.append({"captions": 5 * images, "caption_repeat": 1, "ms": _point(embed, p, repeats)})
    for k in (2, 4):
        p = dataclasses.replace(base, images=100, caption_repeat=k)
        rows.append({"captions": 500, "caption_repeat": k, "ms": _point(embed, p, repeats)})
    return rows


def sweep_stage2(repeats: int) -> list[dict[str, Any]]:
    """Stage-2 step (ms) per variant vs batch size and vs image size."""
    base = stage2.PRESETS["tiny"]
    rows = []
    for batch in (8, 16, 32):
        p = dataclasses.replace(base, batch_size=batch)
        rows.append({"batch": batch, "image_size": base.vit.image_size, "ms": _point(stage2, p, repeats)})
    for size in (32, 128):
        p = dataclasses.replace(base, vit=dataclasses.replace(base.vit, image_size=size))
        rows.append({"batch": base.batch_size, "image_size": size, "ms": _point(stage2, p, repeats)})
    return rows


def sweep_llava(repeats: int) -> list[dict[str, Any]]:
    """LLaVA step (ms) per variant vs sequence length (64 image tokens + text)."""
    base = llava.PRESETS["tiny"]
    return [
        {"seq_len": n, "ms": _point(llava, dataclasses.replace(base, seq_len=n), repeats)}
        for n in (96, 128, 256, 512)
    ]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=("embed", "stage2", "llava"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    rows = {"embed": sweep_embed, "stage2": sweep_stage2, "llava": sweep_llava}[args.suite](args.repeats)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
