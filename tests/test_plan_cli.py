"""``llm2clip-vlm plan``: the per-GPU table and JSON of the reference recipes, the distributed
config each recipe names, "fits" or the knob to turn, and one clear line for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.plan.memory import named_config, read_accelerate, state_bytes
from llm2clip_vlm.plan.meta import Counts

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STAGE_KEYS = {
    "stage", "model", "strategy", "strategy_source", "gpus", "params", "trainable", "four_bit", "micro_batch",
    "seq_len", "checkpointing", "weights_gib", "gradients_gib", "optimizer_gib", "activations_gib",
    "activations_checkpointing_gib", "activations_no_checkpointing_gib", "overhead_gib", "peak_gib",
    "data_ram_per_rank_gib", "store_gib", "records", "epochs", "steps_per_epoch", "step_tflop", "epoch_hours",
    "fits", "knob", "notes", "gpu_memory_gib",
}  # fmt: skip


def plan(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["plan", *args])
    return result.exit_code, result.output


def test_stage2_recipe_on_8_gpus(tmp_path: Path) -> None:
    code, out = plan(
        str(RECIPES / "stage2-openai-clip-vit-l-14-336.yaml"), "--json", str(tmp_path / "p.json")
    )
    assert code == 0, out
    assert "stage2" in out and "peak, GiB" in out and "\nverdict: fits\n" in out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert (doc["gpus"], doc["gpu_memory_gib"], doc["mfu"], doc["peak_tflops"], doc["verdict"]) == (
        8,
        80.0,
        0.4,
        989.0,
        "fits",
    )
    (s,) = doc["stages"]
    assert set(s) == STAGE_KEYS
    assert (s["stage"], s["strategy"], s["params"], s["micro_batch"], s["seq_len"]) == (
        "stage2", "ddp", 578_587_905, 512, 577,
    )  # fmt: skip
    assert s["strategy_source"].endswith("ddp-8gpu.yaml")  # the recipe's own run line
    parts = (
        s["weights_gib"] + s["gradients_gib"] + s["optimizer_gib"] + s["activations_gib"] + s["overhead_gib"]
    )
    assert s["peak_gib"] == pytest.approx(parts, abs=0.01) and s["peak_gib"] < 80
    # fp32 weights, DDP's gradients and buckets, AdamW's two moments: 4 + 8 + 8 bytes per parameter.
    assert s["weights_gib"] == pytest.approx(578_587_905 * 4 / 2**30, abs=0.01)
    assert s["optimizer_gib"] == pytest.approx(2 * s["weights_gib"], abs=0.01)
    assert s["activations_checkpointing_gib"] < s["activations_no_checkpointing_gib"] / 5
    assert s["records"] == 12_873_763 and s["epoch_hours"] > 0


def test_llava_recipe_on_one_small_gpu_names_the_knob(tmp_path: Path) -> None:
    code, out = plan(
        str(RECIPES / "llava15-7b-llm2clip.yaml"), "--tower", "clip-vit-large-patch14-336", "--gpus", "1",
        "--gpu-memory", "24", "--stage", "llava-finetune", "--json", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert code == 0, out
    doc = json.loads((tmp_path / "p.json").read_text())
    (s,) = doc["stages"]
    assert s["strategy"] == "zero3" and s["trainable"] == 6_759_403_520
    # One GPU holds the whole 7B model's 16 bytes per parameter: nothing makes it fit.
    assert not s["fits"] and doc["verdict"].startswith("llava-finetune: ") and s["knob"] != "fits"
    assert s["peak_gib"] > 100


def test_knobs_are_ordered_and_named() -> None:
    # Stage 1's LoRA on 8 GPUs of 24 GiB: micro batch first, 4-bit after.
    code, out = plan(str(RECIPES / "stage1-llama3-8b.yaml"), "--gpu-memory", "24", "--stage", "stage1")
    assert code == 0, out
    (line,) = [x for x in out.splitlines() if x.startswith("verdict: ")]
    assert "stage1: more GPUs or a smaller stage1.batch_size" in line and "sequences per rank fit" in line


def test_a_llava_tower_that_does_not_exist_yet_is_one_line() -> None:
    code, out = plan(str(RECIPES / "llava15-7b-llm2clip.yaml"))
    assert code == 2
    assert "runs/llm2clip-clip-l336/tower" in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu", "Z80"], "unknown --gpu"),
        (["--stage", "stage9"], "unknown --stage"),
        (["--mfu", "1.5"], "--mfu"),
    ],
)
def test_bad_options_are_one_line(args: list[str], message: str) -> None:
    code, out = plan(str(RECIPES / "stage2-siglip2-so400m.yaml"), *args)
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1


def test_missing_recipe_is_one_line(tmp_path: Path) -> None:
    code, out = plan(str(tmp_path / "nope.yaml"))
    assert code == 2 and "does not exist" in out


def test_accelerate_configs_map_to_strategies() -> None:
    acc = RECIPES / "accelerate"
    assert read_accelerate(acc / "ddp-8gpu.yaml").strategy == "ddp"
    assert read_accelerate(acc / "fsdp-8gpu.yaml").strategy == "fsdp"
    assert read_accelerate(acc / "llava-fsdp-8gpu.yaml").strategy == "fsdp"
    assert read_accelerate(acc / "llava-deepspeed-zero3-8gpu.yaml").strategy == "zero3"
    assert read_accelerate(acc / "multinode-2x8.yaml").num_processes == 16
    siglip = (RECIPES / "stage2-siglip2-so400m.yaml").read_text()
    assert named_config(siglip, RECIPES) == Path("recipes/accelerate/fsdp-8gpu.yaml") or (
        named_config(siglip, RECIPES) == RECIPES / "accelerate" / "fsdp-8gpu.yaml"
    )


def test_state_bytes_per_strategy() -> None:
    # 1B parameters, 100M of them trainable in fp32, the rest 16-bit frozen; 8 GPUs.
    c = Counts(params=10**9, trainable=10**8, four_bit=0, weight_bytes=9e8 * 2 + 1e8 * 4, trainable_bytes=4e8)
    ddp = state_bytes(c, "ddp", 8)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (2.2e9, 8e8, 8e8)  # DDP: grads + bucket copy
    assert state_bytes(c, "ddp", 1).gradients == 4e8  # one process: no DDP buckets
    fsdp = state_bytes(c, "fsdp", 8, largest_block=0)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (2.2e9 / 8, 4e8 / 8, 8e8 / 8)
    z3 = state_bytes(c, "zero3", 8)  # ZeRO: 2 (bf16 params) + 2 (bf16 grads) + 12 (fp32 master + moments)
    assert (z3.weights, z3.gradients, z3.optimizer) == (2e9 / 8, 2e8 / 8, 12e8 / 8)
    z2 = state_bytes(c, "zero2", 8)
    assert (z2.weights, z2.gradients) == (2e9, 2e8 / 8)
