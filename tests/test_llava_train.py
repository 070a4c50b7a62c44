"""``llava-pretrain`` / ``llava-finetune`` on a tiny tower and LLM: what trains, what is saved,
exact resume, and 2 processes = 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_env import free_port, join_as_rank
from llava_world import write_llava_world
from safetensors.torch import load_file
from typer.testing import CliRunner

from llm2clip_vlm import config_io
from llm2clip_vlm.cli import app
from llm2clip_vlm.commands import run_llava
from llm2clip_vlm.llava.model import LLAVA_PROJECTOR_KEYS
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.text.tiny import save_tiny_llm


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava_train")
    return {"root": root, **write_llava_world(root, heldout_images=6)}


def _overrides(parts: dict[str, Path], phase: str, extra: list[str] = ()) -> list[str]:
    name = "llava_pretrain.json" if phase == "pretrain" else "llava_instruct.json"
    p = f"llava.{phase}"
    return [
        f"llava.tower={parts['tower']}", f"llava.llm={parts['llm']}",
        f"{p}.data.path={parts['data'] / name}", f"{p}.data.heldout_path={parts['data'] / 'llava_heldout.json'}",
        f"{p}.batch_size=8", f"{p}.micro_batch_size=4", f"{p}.num_workers=0", f"{p}.loop.precision=fp32",
        f"{p}.loop.max_steps=3", f"{p}.eval_max_new_tokens=3", f"{p}.lr=1e-3", f"{p}.loop.warmup_ratio=0",
        f"{p}.gradient_checkpointing=false", *extra,
    ]  # fmt: skip


def _cfg(parts, phase, extra=()) -> RunConfig:
    return config_io.load(RunConfig, None, _overrides(parts, phase, list(extra)))


@pytest.fixture(scope="module")
def pretrained(parts: dict[str, Path]) -> Path:
    out = parts["root"] / "pre"
    run_llava(_cfg(parts, "pretrain"), out, "pretrain")
    return out


def test_pretrain_trains_only_the_projector_and_writes_llava_formats(parts, pretrained: Path) -> None:
    from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert (
        metrics["train"]["steps"] == 3
        and len(metrics["train"]["losses"]) == 3
        and metrics["details"]["tune"] == "projector"
    )
    assert metrics["eval"]["before"]["n"] == 6 and "per_type" in metrics["eval"]["after"]
    # Every held-out evaluation has its blind baseline (shuffled images) and the majority answer.
    for when in ("before", "after"):
        h = metrics["eval"][when]
        assert h["blind"] == "shuffle" and h["gap"] == pytest.approx(h["accuracy"] - h["blind_accuracy"])
        for row in h["per_type"].values():
            assert {"accuracy", "blind_accuracy", "gap", "majority_accuracy", "majority_answer", "n"} <= set(
                row
            )
    lines = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x.get("kind") == "eval"]
    assert evals and all("heldout/blind_accuracy" in x for x in evals)
    assert any(k.startswith("heldout/per_type/") and k.endswith("/majority_accuracy") for k in evals[-1])
    model = LlavaForConditionalGeneration.from_pretrained(pretrained / "model")
    tower = CLIPVisionModel.from_pretrained(parts["tower"])
    for k, v in tower.state_dict().items():  # the tower is frozen
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    for k, v in llm.model.layers[0].state_dict().items():  # so is the LLM
        assert torch.equal(model.model.language_model.layers[0].state_dict()[k], v), k
    # The projector alone, under LLaVA's names, as safetensors and as LLaVA's torch.load file.
    proj = load_file(str(pretrained / "mm_projector.safetensors"))
    assert set(proj) == set(LLAVA_PROJECTOR_KEYS.values())
    legacy = torch.load(pretrained / "mm_projector.bin", weights_only=True)
    assert all(torch.equal(legacy[k], proj[k]) for k in proj)
    assert torch.equal(proj["model.mm_projector.0.weight"], model.model.multi_modal_projector.linear_1.weight)
    assert json.loads((pretrained / "model" / "llava_template.json").read_text())["template"] == "plain"
    # Unmodified transformers loads the processor and the model generates.
    proc = AutoProcessor.from_pretrained(pretrained / "model")
    from PIL import Image

    inputs = proc(images=Image.new("RGB", (40, 30), (255, 0, 0)), text="<image>", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_eval_before_off_skips_the_first_heldout_pass(parts, tmp_path) -> None:
    """``eval_before: false`` (the demo's finetune): only the after pass, with its blind baseline."""
    extra = ["llava.pretrain.eval_before=false", "llava.pretrain.loop.max_steps=1"]
    run_llava(_cfg(parts, "pretrain", extra), tmp_path / "run", "pretrain")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not metrics["eval"]["before"]
    assert metrics["eval"]["after"]["n"] == 6 and metrics["eval"]["after"]["blind"] == "shuffle"
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in evals if x.get("kind") == "eval"] == [1]


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_finetune_starts_from_the_projector_and_trains_the_llm(
    parts, pretrained: Path, tune: str, tmp_path
) -> None:
    from transformers import LlavaForConditionalGeneration

    extra = [f"llava.finetune.tune={tune}", "llava.finetune.lora_r=4", "llava.finetune.lora_alpha=8"]
    if tune == "lora":  # LLaVA's set-up: gradient checkpointing through a frozen base with adapters
        extra.append("llava.finetune.gradient_checkpointing=true")
    seen: list[int] = []
    metrics = run_llava(
        _cfg(parts, "finetune", extra), tmp_path / "ft", "finetune", init=pretrained,
        on_step=lambda step, loss: seen.append(step),
    )  # fmt: skip
    assert seen == [1, 2, 3] and metrics["details"]["template"] == "vicuna_v1"
    before = LlavaForConditionalGeneration.from_pretrained(pretrained / "model").state_dict()
    after = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "ft" / "model"
    )  # LoRA merged: plain LLaVA
    state = after.state_dict()
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], before[q])
    assert not any("lora" in k for k in state)
    v = "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(state[v], before[v])
    chat = tmp_path / "ft" / "model" / "chat_template.jinja"
    assert chat.is_file() or "chat_template" in json.loads(
        (tmp_path / "ft" / "model" / "processor_config.json").read_text()
    )


def test_finetune_continues_the_llm_a_full_pretraining_trained(parts, pretrained: Path, tmp_path) -> None:
    """ShareGPT4V's pretraining also trains the LLM and its finetune starts from that whole
    checkpoint (ShareGPT4Omni/ShareGPT4V scripts/sharegpt4v/slurm_pretrain_7b.sh:
    TUNE_ENTIRE_MODEL=true; slurm_finetune_7b.sh: --model_name_or_path the pretrained checkpoint).
    LLaVA-1.5's pretraining trains the projector alone: its finetune starts from the base LLM."""
    from transformers import AutoModelForCausalLM

    from llm2clip_vlm.errors import BadInputFileError
    from llm2clip_vlm.llava.model import build_model, loaded_llava_name

    extra = [
        "llava.pretrain.tune=full",
        "llava.pretrain.eval_before=false",
        "llava.pretrain.loop.max_steps=2",
    ]
    full = tmp_path / "pre-full"
    run_llava(_cfg(parts, "pretrain", extra), full, "pretrain")
    base = AutoModelForCausalLM.from_pretrained(parts["llm"]).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    llava = _cfg(parts, "finetune").llava

    model, _ = build_model(llava, "finetune", full, torch.float32)
    saved = {loaded_llava_name(k): v for k, v in load_file(str(full / "model" / "model.safetensors")).items()}
    mine = model.state_dict()
    llm_keys = [k for k in mine if k.startswith("model.language_model.")]
    assert llm_keys and all(torch.equal(mine[k], saved[k]) for k in llm_keys)
    assert not torch.equal(mine[f"model.language_model.{q[6:]}"], base[q])  # the pretraining moved it
    proj = load_file(str(full / "mm_projector.safetensors"))
    assert torch.equal(
        mine["model.multi_modal_projector.linear_1.weight"], proj["model.mm_projector.0.weight"]
    )

    # A projector-only pretraining (the fixture), or its projector file alone: the base LLM.
    for init in (pretrained, full / "mm_projector.safetensors"):
        model, _ = build_model(llava, "finetune", init, torch.float32)
        assert torch.equal(model.state_dict()[f"model.language_model.{q[6:]}"], base[q])

    # Another LLM of the same width: one line naming the saved model, not a silent partial load.
    other = _cfg(
        parts, "finetune", [f"llava.llm={save_tiny_llm(tmp_path / 'llm3', hidden_size=64, layers=3)}"]
    )
    with pytest.raises(BadInputFileError, match="another llava.llm") as err:
        build_model(other.llava, "finetune", full, torch.float32)
    assert str(full / "model") in str(err.value)


def test_finetune_without_a_projector_or_tower_says_what_to_run(parts, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["llava-finetune", "-o", str(tmp_path / "x"), "--from", str(tmp_path / "nope")]
    for s in _overrides(parts, "finetune"):
        args += ["--set", s]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "llava-pretrain" in result.output
    args = ["llava-pretrain", "-o", str(tmp_path / "y"), "--tower", str(tmp_path / "no-tower")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "build-tower" in result.output


def test_cli_bad_record_is_named_and_skip_bad_finishes(parts, tmp_path: Path) -> None:
    records = json.loads((parts["data"] / "llava_pretrain.json").read_text())
    records[3]["image"] = "images/pretrain/missing.png"
    bad = parts["data"] / "bad_pretrain.json"
    bad.write_text(json.dumps(records))
    base = [
        *_overrides(parts, "pretrain", ["llava.pretrain.loop.max_steps=1"]),
        f"llava.pretrain.data.path={bad}",
    ]
    args = ["llava-pretrain", "-o", str(tmp_path / "bad")]
    for s in base:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert (
        "skip_bad" in result.output
        and "bad_pretrain.json[#3]" in result.output
        and "does not exist" in result.output
    ), result.output
    more = ["--set", "llava.pretrain.data.skip_bad=true", "--set", "llava.pretrain.data.max_bad_fraction=0.1"]
    result = CliRunner().invoke(app, args + more)
    assert result.exit_code == 0, result.output
    # The console's held-out table: accuracy next to the blind and majority baselines, per type.
    flat = " ".join(result.output.split())  # rich wraps the title at the terminal's width
    for word in ("accuracy", "blind", "gap", "majority", "with another question's image"):
        assert word in flat, result.output
    report = json.loads((tmp_path / "bad" / "metrics.json").read_text())["details"]["bad_records"]
    assert report["count"] == 1 and "#3" in report["records"][0]["record"]
    listed = json.loads((tmp_path / "bad" / "bad_records.json").read_text())["bad_pretrain.json"]
    assert listed["records"] == 24 and "does not exist" in listed["skipped"][0]["reason"]


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_weights(parts, tmp_path: Path) -> None:
    extra = ["llava.pretrain.loop.max_steps=4", "llava.pretrain.loop.save_every_steps=2"]
    full = run_llava(_cfg(parts, "pretrain", extra), tmp_path / "full", "pretrain")

    def kill(step: int, loss: float) -> None:
        if step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        run_llava(_cfg(parts, "pretrain", extra), tmp_path / "cut", "pretrain", on_step=kill)
    done = sorted((tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert [d.name for d in done] == ["step-0000002"]
    resumed = run_llava(_cfg(parts, "pretrain", extra), tmp_path / "cut", "pretrain")
    assert resumed["train"]["losses"] == full["train"]["losses"]
    a = load_file(str(tmp_path / "full" / "mm_projector.safetensors"))
    b = load_file(str(tmp_path / "cut" / "mm_projector.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_is_independent_of_the_micro_batch(parts, tmp_path: Path) -> None:
    a = run_llava(_cfg(parts, "pretrain", ["llava.pretrain.micro_batch_size=8"]), tmp_path / "a", "pretrain")
    b = run_llava(_cfg(parts, "pretrain", ["llava.pretrain.micro_batch_size=3"]), tmp_path / "b", "pretrain")
    assert b["train"]["losses"] == pytest.approx(a["train"]["losses"], abs=1e-5)
    assert a["train"]["losses"][2] != pytest.approx(a["train"]["losses"][0], abs=1e-4)


def _worker(
    rank: int, world: int, port: int, overrides: list[str], out: str, phase: str = "pretrain", init: str = ""
) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    cfg = config_io.load(RunConfig, None, overrides)
    run_llava(cfg, Path(out), phase, init=init or None)


@pytest.mark.slow  # spawns 2 processes
def test_two_processes_match_one_process_with_the_same_global_batch(parts, tmp_path: Path) -> None:
    overrides = _overrides(parts, "pretrain")
    one = run_llava(config_io.load(RunConfig, None, overrides), tmp_path / "one", "pretrain")["train"][
        "losses"
    ]
    mp.spawn(_worker, args=(2, free_port(), overrides, str(tmp_path / "two")), nprocs=2)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train"]["losses"]
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5)


@pytest.mark.slow  # spawns 2 processes
def test_two_processes_finetune_like_one_process(parts, pretrained: Path, tmp_path: Path) -> None:
    # Full finetuning of the LLM and the projector: gradients of every weight are all-reduced.
    overrides = _overrides(parts, "finetune", ["llava.finetune.tune=full"])
    one = run_llava(config_io.load(RunConfig, None, overrides), tmp_path / "one", "finetune", init=pretrained)
    args = (2, free_port(), overrides, str(tmp_path / "two"), "finetune", str(pretrained))
    mp.spawn(_worker, args=args, nprocs=2)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["train"]["losses"]
    assert len(two) == 3 and two == pytest.approx(one["train"]["losses"], abs=1e-5)


def test_qlora_finetune_merges_into_a_full_precision_llava(parts, pretrained: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import LlavaForConditionalGeneration

    extra = ["llava.finetune.tune=qlora", "llava.finetune.lora_r=4", "llava.finetune.lora_alpha=8",
             "llava.finetune.loop.max_steps=2"]  # fmt: skip
    metrics = run_llava(_cfg(parts, "finetune", extra), tmp_path / "q", "finetune", init=pretrained)
    assert metrics["train"]["steps"] == 2 and all(map(lambda x: x == x, metrics["train"]["losses"]))
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "q" / "model")
    assert getattr(model.config, "quantization_config", None) is None
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    before = LlavaForConditionalGeneration.from_pretrained(pretrained / "model")
    q = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, before.model.language_model.layers[0].self_attn.q_proj.weight)


def test_token_loss_equals_transformers_loss_with_logits_kept_only_where_needed(
    parts, pretrained: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llm2clip_vlm.data.conversations import load_llava_records
    from llm2clip_vlm.llava.data import Collator, LlavaDataset
    from llm2clip_vlm.llava.step import token_loss_sum

    model = LlavaForConditionalGeneration.from_pretrained(pretrained / "model").eval()
    proc = AutoProcessor.from_pretrained(pretrained / "model")
    recs = load_llava_records(parts["data"] / "llava_instruct.json")[:6]
    cfg = model.config
    ds = LlavaDataset(recs, proc.tokenizer, proc.image_processor, "vicuna_v1", cfg.image_token_index,
                      cfg.image_seq_length, 512)  # fmt: skip
    batch = Collator(proc.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        ours = token_loss_sum(model, batch, torch.device("cpu"))
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    pixel_values=batch.pixel_values, labels=batch.labels).loss  # fmt: skip
    assert float(ours) == pytest.approx(float(ref) * batch.num_supervised, rel=1e-5)


def test_a_shared_prefix_and_supervised_only_logits_keep_the_full_batchs_loss_and_gradients(
    parts, pretrained: Path
) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llm2clip_vlm.data.conversations import load_llava_records
    from llm2clip_vlm.llava.data import Collator, LlavaDataset
    from llm2clip_vlm.llava.step import shared_prefix_length, token_loss_sum

    model = LlavaForConditionalGeneration.from_pretrained(pretrained / "model").eval()  # no dropout
    proc = AutoProcessor.from_pretrained(pretrained / "model")
    recs = [r for r in load_llava_records(parts["data"] / "llava_instruct.json") if r.has_image][:5]
    cfg = model.config
    ds = LlavaDataset(recs, proc.tokenizer, proc.image_processor, "vicuna_v1", cfg.image_token_index,
                      cfg.image_seq_length, 512)  # fmt: skip
    batch = Collator(proc.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    # vicuna_v1: every row starts with the system prompt and "USER:", then its image.
    prefix = shared_prefix_length(batch, cfg.image_token_index)
    assert prefix == int((batch.input_ids[0] == cfg.image_token_index).nonzero()[0]) > 20
    assert shared_prefix_length(batch.split(1)[0], cfg.image_token_index) == 0
    read: list[int] = []  # token positions the LLM's embedding looked up, call by call
    hook = model.model.language_model.embed_tokens.register_forward_hook(
        lambda mod, args, out: read.append(args[0].numel())
    )
    results = {}
    # (prefix, head): the full batch; the prefix once; and only supervised pairs through the head.
    for k, head in ((0, None), (prefix, None), (prefix, model.lm_head)):
        model.zero_grad()
        read.clear()
        loss = token_loss_sum(model, batch, torch.device("cpu"), k, head)
        loss.backward()
        grads = {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
        results[k, head is not None] = (float(loss.detach()), grads, list(read))
    hook.remove()
    assert not model.lm_head._forward_pre_hooks  # the head's hook lives for one call only
    full, g_full, read_full = results[0, False]
    rows, width = batch.input_ids.shape
    assert read_full == [rows * width]
    for shared, g_shared, read_shared in (results[prefix, False], results[prefix, True]):
        assert read_shared == [prefix, rows * (width - prefix)]
        assert shared == pytest.approx(full, rel=1e-5)
        assert g_shared.keys() == g_full.keys() and len(g_full) > 10  # the LLM's and the projector's
        for name, g in g_full.items():
            assert torch.allclose(g_shared[name], g, rtol=1e-3, atol=1e-6), name


def test_an_llm_with_pickled_weights_only_is_refused_unless_allowed(parts, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm2clip_vlm.llava.assemble import build_llava_model

    pickled = tmp_path / "pickled-llm"
    llm = AutoModelForCausalLM.from_pretrained(parts["llm"])
    llm.config.save_pretrained(pickled)
    torch.save(llm.state_dict(), pickled / "pytorch_model.bin")  # how older hub checkpoints ship
    AutoTokenizer.from_pretrained(parts["llm"]).save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").is_file() and not (pickled / "model.safetensors").exists()
    with pytest.raises(OSError, match="safetensors"):
        build_llava_model(parts["tower"], pickled)
    model, _ = build_llava_model(parts["tower"], pickled, allow_pickle=True)
    assert model.config.text_config.hidden_size == 64


def test_warmup_reaches_the_full_lr_at_its_last_step() -> None:
    from llm2clip_vlm.training.optim import lr_factor

    # (step + 1) / warmup, as microsoft/LLM2CLIP llm2clip/training/scheduler.py:9-10.
    assert [lr_factor(s, 4, 100, "cosine") for s in range(5)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 1.0], abs=1e-3
    )
    assert lr_factor(0, 0, 10, "constant") == 1.0


def test_a_single_cpu_process_uses_fused_adamw_with_the_same_updates() -> None:
    from llm2clip_vlm.llava.train import fused_adamw
    from llm2clip_vlm.training.optim import adamw

    cpu = torch.device("cpu")
    assert fused_adamw(cpu, 1, False) is True
    assert fused_adamw(cpu, 2, False) is None and fused_adamw(cpu, 1, True) is None
    assert fused_adamw(torch.device("cuda"), 1, False) is None  # torch's choice on a GPU, as before
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    final = {}
    for fused in (None, True):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}]
        opt = adamw(groups, 1e-2, cpu, betas=(0.9, 0.999), eps=1e-8, fused=fused)
        assert opt.defaults["fused"] is fused
        for g in grads:
            for t, gt in zip(params, g, strict=True):
                t.grad = gt.clone()
            opt.step()
        final[fused] = [t.detach() for t in params]
    for a, b, s in zip(final[None], final[True], start, strict=True):
        assert (a - s).abs().max() > 1e-2  # five steps moved them
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
