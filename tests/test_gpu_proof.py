"""``scripts/gpu-proof.sh --dry-run``: the GPU proof's every step, tiny and on the CPU, so the script
is known to work before a GPU machine is lent for the minutes it takes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ["bench-stage1", "bench-embed", "bench-stage2", "stage2-stream", "bench-tower", "bench-llava",
         "build-tower", "llava-pretrain", "fsdp", "plan"]  # fmt: skip


@pytest.mark.slow  # ~1-2 min on an idle CPU (each step is its own process)
def test_gpu_proof_dry_run_runs_every_step_and_writes_json_and_rows(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-proof.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    doc = json.loads((tmp_path / "gpu-proof.json").read_text())
    assert list(doc["steps"]) == STEPS
    bad = {n: r.get("error") for n, r in doc["steps"].items() if r["status"] not in ("ok", "skipped")}
    assert not bad and proc.returncode == 0, bad
    assert doc["dry_run"] and doc["commit"] and doc["date"] and "gpu-proof.sh --dry-run" in doc["command"]
    steps = doc["steps"]
    for name in STEPS[:6]:  # every bench suite reports its figures
        assert steps[name]["seconds"] <= steps[name]["budget_s"]
    for name in ("bench-stage1", "bench-embed", "bench-stage2", "bench-tower", "bench-llava"):
        assert steps[name]["figures"]["timings"], name  # the bench's own JSON report
    llava = {t["name"] for t in steps["bench-llava"]["figures"]["timings"]}
    assert {"pretrain", "finetune-full"} <= llava
    stream = steps["stage2-stream"]["figures"]
    assert stream["images_per_s"] > 0 and 0 < stream["busy_share"] <= 1 and "loader_keeps_up" in stream
    fsdp = steps["fsdp"]["figures"]
    assert fsdp["reload_identical"] and len(fsdp["losses"]) == 3 and fsdp["checkpoint_mb"] > 0
    assert (tmp_path / "demo" / "tower").is_dir() and (
        tmp_path / "llava-pretrain" / "mm_projector.safetensors"
    ).is_file()
    plan = steps["plan"]
    assert plan["status"] == "ok" or "not in this checkout" in plan["figures"]["message"]
    rows = (tmp_path / "gpu-proof.md").read_text()
    assert rows.count("\n| ") == len(STEPS) + 2 and "dry run on the CPU" in rows  # header, rule, rows
