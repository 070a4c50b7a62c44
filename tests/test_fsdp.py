"""FSDP2 (torch's ``fully_shard``) on 2 CPU processes over gloo: stage 2 and LLaVA full finetuning.

For each: a sharded run (``loop.distributed=fsdp2``) gives the weights of the unsharded
1-process run; its checkpoints hold every rank's shards (safetensors, no pickle); a run SIGKILLed
after a checkpoint resumes to the uninterrupted sharded run's weights exactly; and the exported
model (tower / LLaVA in transformers' format) is the full model gathered from the shards.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_env import free_port, join_as_rank
from safetensors import safe_open
from safetensors.torch import load_file

from llm2clip_vlm.training.checkpoint import Checkpointer

FSDP_STAGE2 = ["stage2.batch_size=8", "stage2.loop.max_steps=4", "stage2.loop.save_every_steps=2",
               "stage2.lr=1e-3", "stage2.adaptor_blocks=2"]  # fmt: skip
KILL_AT = 3  # after the step-2 checkpoint


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``folder`` (keyed ``relative/file:name``)."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(folder)}:{k}"] = v
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and a
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"largest difference {worst:.3g} > {atol}"


def _killer(rank: int):  # noqa: ANN202 - the loop's on_step
    def on_step(step: int, loss: float) -> None:
        if step == KILL_AT:  # a hard kill: no handler, no checkpoint of this step
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def _join(ctx: mp.ProcessContext) -> None:
    """Wait for spawned ranks; when one dies the others (stuck in a collective) are killed soon."""
    while not ctx.join(grace_period=1):
        pass


def _check_sharded_checkpoint(ckpt: Path, key: str, rows: int) -> None:
    """Two rank files of safetensors (rank r holds half of the rows of ``key``), the optimizer's
    settings as JSON, and no full copy of the weights. No pickle but the scheduler's (the package's
    policy: written with torch.save, read only with ``torch.load(weights_only=True)``); in
    particular not DCP's default ``.metadata`` pickle, which is read with ``pickle.load``."""
    files = sorted(p.name for p in ckpt.rglob("*") if p.is_file())
    assert [f for f in files if f.endswith((".pt", ".bin", ".pkl", ".metadata"))] == ["scheduler.pt"]
    assert "model.safetensors" not in files and "optimizer_settings.json" in files
    shards = sorted((ckpt / "sharded").glob("*.safetensors"))
    assert len(shards) == 2
    for f in shards:
        with safe_open(str(f), framework="pt") as st:
            assert st.get_slice(key).get_shape()[0] == rows // 2  # half of the rows per rank
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert any(name.startswith("sharded/") for name in meta["sha256"])  # shards are checksummed too


# -- stage 2 ------------------------------------------------------------------------------------
def _stage2_worker(rank: int, world: int, port: int, root: str, runs: list[tuple[str, bool]]) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    from test_stage2 import _run

    for out, kill in runs:
        _run(Path(root), Path(out), [*FSDP_STAGE2, "stage2.loop.distributed=fsdp2"],
             on_step=_killer(rank) if kill else None)  # fmt: skip


@pytest.mark.slow  # 2 x 2 processes + 1: ~30-60 s on a shared 2-core CPU
def test_stage2_fsdp2_matches_one_process_and_resumes_exactly_after_sigkill(tmp_path: Path) -> None:
    from test_stage2 import _run

    data, sharded, cut = tmp_path / "data", tmp_path / "fsdp", tmp_path / "cut"
    one = _run(data, tmp_path / "one", FSDP_STAGE2)["train"]
    # The uninterrupted sharded run, then one SIGKILLed by rank 0 after step 3.
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        _join(mp.spawn(_stage2_worker, args=(2, free_port(), str(data), [(str(sharded), False), (str(cut), True)]),
                       nprocs=2, join=False))  # fmt: skip
    assert (sharded / "metrics.json").is_file() and not (cut / "metrics.json").exists()
    assert Checkpointer(cut / "checkpoints").latest().name == "step-0000002"  # type: ignore[union-attr]
    _join(
        mp.spawn(_stage2_worker, args=(2, free_port(), str(data), [(str(cut), False)]), nprocs=2, join=False)
    )

    two = json.loads((sharded / "metrics.json").read_text())["train"]
    resumed = json.loads((cut / "metrics.json").read_text())["train"]
    assert two["processes"] == 2 and len(two["losses"]) == 4
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)  # sharded = unsharded
    assert resumed["losses"] == two["losses"]  # resumed = uninterrupted, exactly
    # The exported model (tower in its own format + head + adaptor), gathered from the shards.
    _assert_same(_weights(sharded / "model"), _weights(tmp_path / "one" / "model"), atol=1e-5)
    _assert_same(_weights(cut / "model"), _weights(sharded / "model"), atol=0.0)
    # 32-wide tiny ViT: fc1 of block 0 has 4 * 32 rows, split over the 2 ranks.
    _check_sharded_checkpoint(sharded / "checkpoints" / "step-0000004",
                              "model.vision.model.encoder.layers.0.mlp.fc1.weight", 128)  # fmt: skip
    assert one["losses"][-1] != pytest.approx(one["losses"][0], abs=1e-3)  # the steps changed the model


# -- LLaVA full finetuning ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llava_world import write_llava_world

    from llm2clip_vlm import config_io
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.recipe import RunConfig

    root = tmp_path_factory.mktemp("fsdp_llava")
    parts = write_llava_world(root, heldout_images=2)
    pre = _llava_overrides(parts, "pretrain", ["llava.pretrain.loop.max_steps=1"])
    run_llava(config_io.load(RunConfig, None, pre), root / "pre", "pretrain")
    return {**parts, "pre": root / "pre"}


def _llava_overrides(parts: dict[str, Path], phase: str, extra: list[str] = ()) -> list[str]:
    name = "llava_pretrain.json" if phase == "pretrain" else "llava_instruct.json"
    p = f"llava.{phase}"
    return [
        f"llava.tower={parts['tower']}", f"llava.llm={parts['llm']}", f"{p}.data.path={parts['data'] / name}",
        f"{p}.batch_size=8", f"{p}.micro_batch_size=4", f"{p}.num_workers=0", f"{p}.loop.precision=fp32",
        f"{p}.lr=1e-3", f"{p}.loop.warmup_ratio=0", f"{p}.gradient_checkpointing=false", *extra,
    ]  # fmt: skip


LLAVA_FT = [
    "llava.finetune.tune=full",
    "llava.finetune.loop.max_steps=4",
    "llava.finetune.loop.save_every_steps=2",
]


def _llava_worker(
    rank: int, world: int, port: int, parts: dict[str, Path], runs: list[tuple[str, bool]]
) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    from llm2clip_vlm import config_io
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.recipe import RunConfig

    overrides = _llava_overrides(parts, "finetune", [*LLAVA_FT, "llava.finetune.loop.distributed=fsdp2"])
    for out, kill in runs:
        cfg = config_io.load(RunConfig, None, overrides)
        run_llava(cfg, Path(out), "finetune", init=parts["pre"], on_step=_killer(rank) if kill else None)


@pytest.mark.slow  # 2 x 2 processes + 1: ~40-80 s on a shared 2-core CPU
def test_llava_full_finetune_fsdp2_matches_one_process_and_resumes_exactly_after_sigkill(
    llava_parts: dict[str, Path], tmp_path: Path
) -> None:
    from llm2clip_vlm import config_io
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.recipe import RunConfig

    sharded, cut = tmp_path / "fsdp", tmp_path / "cut"
    cfg = config_io.load(RunConfig, None, _llava_overrides(llava_parts, "finetune", LLAVA_FT))
    one = run_llava(cfg, tmp_path / "one", "finetune", init=llava_parts["pre"])
    with pytest.raises(mp.ProcessExitedException, match="signal SIGKILL"):
        _join(mp.spawn(_llava_worker, args=(2, free_port(), llava_parts, [(str(sharded), False), (str(cut), True)]),
                       nprocs=2, join=False))  # fmt: skip
    assert Checkpointer(cut / "checkpoints").latest().name == "step-0000002"  # type: ignore[union-attr]
    _join(
        mp.spawn(_llava_worker, args=(2, free_port(), llava_parts, [(str(cut), False)]), nprocs=2, join=False)
    )

    two = json.loads((sharded / "metrics.json").read_text())["train"]
    resumed = json.loads((cut / "metrics.json").read_text())["train"]
    assert two["processes"] == 2 and len(two["losses"]) == 4
    assert two["losses"] == pytest.approx(one["train"]["losses"], abs=1e-5)  # sharded = unsharded
    assert resumed["losses"] == two["losses"]  # resumed = uninterrupted, exactly
    # The exported LLaVA (transformers' format) and projector, gathered from the shards.
    exported = _weights(sharded / "model")
    _assert_same(exported, _weights(tmp_path / "one" / "model"), atol=1e-5)
    _assert_same(_weights(cut / "model"), exported, atol=0.0)
    _assert_same(load_file(str(cut / "mm_projector.safetensors")),
                 load_file(str(sharded / "mm_projector.safetensors")), atol=0.0)  # fmt: skip
    block = "layers.0.mlp.gate_proj.weight"  # the LLM's first decoder layer (the tower has no gate_proj)
    (saved,) = [k for k in exported if k.endswith(block)]
    rows = exported[saved].shape[0]
    _check_sharded_checkpoint(sharded / "checkpoints" / "step-0000004",
                              f"model.model.language_model.{block}", rows)  # fmt: skip
    # The LLM trained (full finetuning), not only the projector.
    before = load_file(str(llava_parts["llm"] / "model.safetensors"))
    assert not torch.equal(before[f"model.{block}"], exported[saved])


# -- policies and refusals (no processes) ---------------------------------------------------------
def test_mixed_precision_policy_follows_the_recipe_on_a_gpu_and_is_fp32_on_a_cpu() -> None:
    from llm2clip_vlm.training.fsdp import mixed_precision

    gpu = mixed_precision("bf16", torch.device("cuda"))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    for policy in (
        mixed_precision("bf16", torch.device("cpu")),
        mixed_precision("fp32", torch.device("cuda")),
    ):
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)  # fp32 throughout


def test_wrapping_hooks_name_the_transformer_blocks() -> None:
    from llm2clip_vlm.vision.backbones import create_backbone
    from llm2clip_vlm.vision.config import VisionBackboneConfig
    from llm2clip_vlm.vision.model import LLM2CLIP, LLM2CLIPConfig

    cfg = VisionBackboneConfig(
        kind="clip", image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2
    )
    model = LLM2CLIP(
        LLM2CLIPConfig(backbone=cfg, text_dim=24, embed_dim=16, adaptor_blocks=2), create_backbone(cfg)
    )
    blocks = model.fsdp_blocks()
    assert [type(b).__name__ for b in blocks] == ["CLIPEncoderLayer"] * 3 + ["ResidualMLPBlock"] * 2


def test_a_stage_that_does_not_shard_is_refused_under_fsdp2_and_checkpoints_keep_their_kind(
    tmp_path: Path,
) -> None:
    from llm2clip_vlm.training.config import LoopConfig
    from llm2clip_vlm.training.loop import Run

    run = Run("stage1", LoopConfig(distributed="fsdp2"), tmp_path / "a", None)
    with pytest.raises(ValueError, match="stage1 does not shard with FSDP2.*DDP or DeepSpeed"):
        run.prepare(torch.nn.Linear(2, 2), None, None)
    ckpt = tmp_path / "b" / "step-0000001"
    (ckpt / "sharded").mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 1, "world_size": 1, "files": {}, "state": {}}))
    with pytest.raises(ValueError, match="holds FSDP2 shards.*loop.distributed \\(fsdp2\\)"):
        Run("stage2", LoopConfig(), tmp_path / "b", None)
