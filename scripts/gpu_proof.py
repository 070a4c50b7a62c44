"""The GPU proof: every figure owed to a GPU in one run of at most 10 minutes (``scripts/gpu-proof.sh``).

Steps (each a subprocess with its own time budget; a failed or timed-out step records its error
and the run goes on):

1. ``bench stage1`` (Llama-3-8B shape, LoRA and QLoRA), ``bench embed`` (8B, share of the bf16
   peak), ``bench stage2`` (ViT-L/14-336 + Llama-3-8B), ``bench tower`` (ViT-L/14-336 in LLaVA),
   ``bench llava`` (Vicuna-7B step): random weights built from configs, nothing downloaded;
2. ``stage2-stream``: stage 2 on ViT-L/14-336 (random) at the recipe's per-GPU batch from
   webdataset shards of synthetic JPEGs, through the trainer's own streamed loader: images/s of
   the loop, and whether the loader keeps the GPU busy (the step's time with a cached batch
   against the step's time fed by the loader);
3. ``build-tower`` and ``llava-pretrain`` on the embedded demo;
4. ``fsdp``: stage 2 sharded with FSDP2 (``loop.distributed=fsdp2``) for two steps on one GPU;
5. ``plan``: ``llm2clip-vlm plan RECIPE --gpus 1 --json`` against the measured peaks (skipped with
   a message while the ``plan`` command is not in the checkout).

Writes ``OUT/gpu-proof.json`` (every figure, device, date, command, git commit) and
``OUT/gpu-proof.md`` (rows for docs/BENCHMARKS.md). ``--dry-run`` runs the same steps with tiny
sizes on the CPU (the test suite runs it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "llm2clip_vlm.cli"]


@dataclass
class Step:
    """One step: a command, its time budget (seconds), and how to read its figures."""

    name: str
    argv: list[str]
    budget: float
    reads: str = "json"  # "json": stdout is one JSON object; "files": figures from files it wrote
    figures: dict[str, Any] = field(default_factory=dict)


def _bench(suite: str, preset: str, dry: bool, budget: float, extra: list[str] = ()) -> Step:
    args = ["--repeats", "1", "--warmup", "0"] if dry else []
    return Step(f"bench-{suite}", [*CLI, "bench", suite, "--preset", preset, "--json", *args, *extra], budget)


# A dry run's LLM for build-tower / llava-pretrain (a random 2-layer Llama): SmolLM2-135M's steps
# take minutes on a loaded CPU; the GPU run uses the demo's own SmolLM2.
TINY_LLM = "tiny-llm"
DRY_BUDGET = 300.0  # a dry run's steps are tiny: the budget only stops a hang (CI machines vary)


def steps(out: Path, dry: bool) -> list[Step]:
    """The proof's steps: reference sizes on a GPU, tiny ones with ``dry``."""
    found = _steps(out, dry)
    if dry:
        for s in found:
            s.budget = DRY_BUDGET
    return found


def _steps(out: Path, dry: bool) -> list[Step]:
    """The steps with their budgets on one H100 (576 s together; a dry run replaces them)."""
    demo, dry_flag = out / "demo", (["--dry-run"] if dry else [])
    helper = [sys.executable, str(Path(__file__).with_name("gpu_proof_steps.py"))]
    shrink = (
        ["--set", "data.demo_train_images=48", "--set", "data.demo_heldout_images=16", "--set", "stage2.batch_size=16",
         "--set", "stage1.loop.max_steps=1", "--set", "stage2.loop.max_steps=1", "--set", f"stage1.model={out / TINY_LLM}"]
        if dry else ["--set", "stage1.loop.max_seconds=30", "--set", "stage2.loop.max_seconds=30"]
    )  # fmt: skip
    llava = (
        ["--set", "llava.pretrain.loop.max_steps=1", "--set", "llava.pretrain.data.max_samples=16",
         "--set", "llava.pretrain.data.heldout_max_samples=2", "--set", f"llava.llm={out / TINY_LLM}"]
        if dry else ["--set", "llava.pretrain.loop.max_seconds=20"]
    )  # fmt: skip
    pretrain = [
        *CLI,
        "llava-pretrain",
        "--tower",
        str(demo / "tower"),
        "-o",
        str(out / "llava-pretrain"),
        *llava,
    ]
    return [
        _bench("stage1", "tiny" if dry else "llama3-8b", dry, 80),
        _bench("embed", "dry" if dry else "llama3-8b", dry, 50),
        _bench("stage2", "dry" if dry else "vit-l-336-llama3-8b", dry, 60),
        Step("stage2-stream", [*helper, "stream", str(out / "stream"), *dry_flag], 60),
        _bench("tower", "tiny" if dry else "vit-l-14-336", dry, 25),
        _bench("llava", "tiny" if dry else "vicuna-7b", dry, 70),
        Step("build-tower", [*CLI, "build-tower", "--output", str(demo), *shrink], 120, "files"),
        Step("llava-pretrain", pretrain, 56, "files"),
        Step("fsdp", [*helper, "fsdp", str(out / "fsdp"), *dry_flag], 30),
        Step("plan", [*helper, "plan", str(out / "plan"), *dry_flag], 25),
    ]


def _files_figures(step: Step, out: Path) -> dict[str, Any]:
    """Figures of a command that writes a run directory (its metrics.json)."""
    folder = out / ("demo" if step.name == "build-tower" else step.name)
    found = {}
    for m in sorted(folder.rglob("metrics.json")):
        found[str(m.parent.relative_to(folder)) or "."] = json.loads(m.read_text())
    return _trim(found.get(".", found))  # the run's own metrics.json holds its stages' figures


def _trim(x: Any, depth: int = 0) -> Any:
    """Drop long per-step lists (losses) from figures kept in the JSON: totals are what is compared."""
    if isinstance(x, dict):
        return {k: _trim(v, depth + 1) for k, v in x.items() if k not in ("losses", "examples")}
    if isinstance(x, list) and len(x) > 20:
        return x[:20]
    return x


def run_step(step: Step, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one step under its budget; never raises: an error or a timeout is recorded."""
    started = time.perf_counter()
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"command": shlex.join(step.argv), "budget_s": step.budget}
    try:
        proc = subprocess.run(
            step.argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=step.budget, check=False
        )
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        record["exit_code"] = proc.returncode
        if proc.returncode == 0:
            record["status"] = "ok"
            if step.reads == "json":
                text = proc.stdout[proc.stdout.find("{") :]
                record["figures"] = json.loads(text) if text else {}
            else:
                record["figures"] = _files_figures(step, out)
            if isinstance(record.get("figures"), dict) and record["figures"].get("skipped"):
                record["status"] = "skipped"
        else:
            record["status"] = "error"
            record["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    except subprocess.TimeoutExpired as e:
        record["status"] = "timeout"
        record["error"] = [f"over its budget of {step.budget:.0f} s"]
        log.write_text(str(e.stdout or "") + "\n--- stderr ---\n" + str(e.stderr or ""))
    except (OSError, ValueError) as e:  # an unreadable JSON, a missing interpreter
        record["status"] = "error"
        record["error"] = [f"{type(e).__name__}: {e}"]
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def _headline(name: str, figures: Any) -> str:
    """One line of the figures that matter for a step (the markdown row)."""
    if not isinstance(figures, dict):
        return ""
    parts = []
    # Each stage's metrics.json has schema 1 (training/session.py); build-tower's holds two of them.
    s1, s2 = figures.get("stage1") or {}, figures.get("stage2") or {}
    if s1:  # build-tower's metrics.json
        t1, cra = s1.get("train") or {}, s1.get("eval") or {}
        parts.append(f"stage1 {t1.get('steps')} steps, {t1.get('seconds_per_step')} s/step, CRA "
                     f"{cra.get('before')} -> {cra.get('after')}")  # fmt: skip
    if s2:
        t2 = s2.get("train") or {}
        parts.append(f"stage2 {t2.get('steps')} steps, {t2.get('samples_per_second')} images/s")
    if str(figures.get("stage", "")).startswith("llava"):  # a llava run's metrics.json
        tl = figures.get("train") or {}
        parts.append(f"{tl.get('steps')} steps, {tl.get('samples_per_second')} samples/s")
    for t in figures.get("timings") or []:  # a bench report
        mem = f", peak {t['peak_memory_bytes'] / 2**20:.0f} MiB" if t.get("peak_memory_bytes") else ""
        parts.append(f"{t['name']}: {t['median_ms']:.1f} ms, {t['items_per_s']:.1f}/s{mem}")
    for k, v in figures.items():  # embed: per-variant share of the bf16 peak
        if isinstance(v, dict) and v.get("peak_share") is not None:
            parts.append(f"{k} peak_share {v['peak_share']}")
    for k, v in (figures.get("results") or {}).items():
        if "peak_share" in k or "tokens_per_s" in k:
            parts.append(f"{k} {v}")
    for k in ("images_per_s", "loader_images_per_s", "step_images_per_s", "busy_share", "loader_keeps_up",
              "step_s", "peak_mem_mb", "reload_identical", "message", "note"):  # fmt: skip
        if figures.get(k) not in (None, ""):
            parts.append(f"{k} {figures[k]}")
    for row in figures.get("comparisons") or []:
        parts.append(
            f"{row['what']}: plan {row.get('predicted_peak_mib')} / measured {row.get('measured_peak_mib')} MiB"
        )
    return "; ".join(parts)[:600]


def markdown(doc: dict[str, Any]) -> str:
    rows = [
        f"GPU proof on {doc['device']}, {doc['date']}, commit {doc['commit'][:12]}: `{doc['command']}`"
        f" ({doc['total_seconds']:.0f} s{', dry run on the CPU' if doc['dry_run'] else ''}).",
        "",
        "| step | status | seconds (budget) | figures |",
        "| --- | --- | --- | --- |",
    ]
    for name, r in doc["steps"].items():
        what = _headline(name, r.get("figures")) or " / ".join(r.get("error", []))[-300:]
        rows.append(
            f"| {name} | {r['status']} | {r['seconds']} ({r['budget_s']:.0f}) | {what.replace('|', '/')} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-proof"), help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="the same steps, tiny sizes, on the CPU")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps (names)")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # fmt: skip
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a GPU machine
        code = f"from llm2clip_vlm.text.tiny import save_tiny_llm; save_tiny_llm({str(out / TINY_LLM)!r}, hidden_size=64)"
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "command": shlex.join(["scripts/gpu-proof.sh", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git_commit(),
        "device": "CPU (dry run)" if args.dry_run else _device(),
        "dry_run": args.dry_run,
        "steps": {},
    }
    for step in steps(out, args.dry_run):
        if args.only and step.name not in args.only:
            continue
        print(f"[gpu-proof] {step.name} (budget {step.budget:.0f} s) ...", flush=True)
        doc["steps"][step.name] = r = run_step(step, out, env)
        print(f"[gpu-proof] {step.name}: {r['status']} in {r['seconds']} s", flush=True)
        if step.name == "fsdp" or step.name.startswith("bench-"):
            (out / "measured.json").write_text(
                json.dumps({k: v.get("figures") for k, v in doc["steps"].items()})
            )
    doc["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu-proof.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "gpu-proof.md").write_text(markdown(doc))
    print(markdown(doc))
    failed = [n for n, r in doc["steps"].items() if r["status"] not in ("ok", "skipped")]
    print(
        f"[gpu-proof] {out / 'gpu-proof.json'}; "
        + (f"failed: {', '.join(failed)}" if failed else "every step ok")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
