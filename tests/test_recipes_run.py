"""Every recipe runs as written: end to end for a few steps, from a folder laid out as they expect.

``tests/recipe_world.py`` writes tiny stand-ins at the model ids and data paths the recipes name;
each command runs from that folder with the recipe unchanged, overriding only sizes and step counts
through ``--set`` (what a user would change to try a recipe on a small machine). The commands run in
this process (one import of torch and transformers for all of them); the DDP launcher config runs
as 2 CPU processes (gloo) through ``accelerate launch``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dist_env import free_port
from recipe_world import EVA02, LLAMA3, LLM2VEC_ADAPTERS, build_recipe_world, write_timm_eva
from typer.testing import CliRunner

from llm2clip_vlm.cli import app, demo_recipe_path

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"

# E5 instructions are long for the tiny byte-level tokenizer: 160 tokens keep every query's text.
S1 = ["stage1.batch_size=4", "stage1.loop.max_steps=2", "stage1.max_length=160", "stage1.mntp.loop.max_steps=2",
      "stage1.mntp.batch_size=4"]  # fmt: skip
S2 = ["stage2.batch_size=8", "stage2.loop.max_steps=2", "stage2.num_workers=0", "stage2.eval_batch_size=16"]


def _llava(phase: str) -> list[str]:
    p = f"llava.{phase}"
    return [f"{p}.batch_size=4", f"{p}.micro_batch_size=2", f"{p}.loop.max_steps=2", f"{p}.num_workers=0",
            f"{p}.max_length=256"]  # fmt: skip


# Every recipe file -> the test that runs it (a new recipe without a run here fails the first test).
RUN_BY = {
    "stage1-llama3-8b.yaml": "test_stage1_recipe_on_img2dataset_folder",
    "stage1-llama3-8b-qlora.yaml": "test_stage1_qlora_recipe",
    "stage2-openai-clip-vit-l-14-336.yaml": "test_stage2_openai_clip_recipe_and_export",
    "stage2-siglip2-so400m.yaml": "test_stage2_siglip_recipe_streamed",
    "stage2-eva02-l-14-336.yaml": "test_stage2_eva02_recipe",
    "llava15-7b-clip-vit-l-14-336.yaml": "test_llava_clip_baseline_recipe",
    "llava15-7b-llm2clip.yaml": "test_llava_llm2clip_recipes",
    "llava15-7b-llm2clip-lora.yaml": "test_llava_llm2clip_recipes",
    "llava15-7b-llm2clip-released.yaml": "test_llava_released_tower_recipe",
    "llava15-7b-llm2clip-siglip2-so400m-224.yaml": "test_llava_siglip2_released_tower_recipe",
    "llava15-7b-llm2clip-eva02-l-14-336.sh": "test_eva02_recipe_runs_llavas_scripts_through_the_shim",
    "eval-llava15-7b.sh": "test_eval_script",
    "demo.yaml": "test_demo_recipe_end_to_end",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_recipe_world(tmp_path_factory.mktemp("recipe_world"))


@pytest.fixture
def in_world(world: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run from the world folder (relative recipe paths), offline, restoring torch's thread count."""
    monkeypatch.chdir(world)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield world
    torch.set_num_threads(threads)


def cli(*args: str) -> str:
    """Run one ``llm2clip-vlm`` command in this process; fail with its output if it fails."""
    from accelerate.state import AcceleratorState, GradientState

    # Each command is a fresh program: drop the accelerate singletons an earlier command set up
    # (a recipe may ask for another mixed precision than the command before it).
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    argv = list(args)
    result = CliRunner().invoke(app, argv, catch_exceptions=True)
    if result.exit_code != 0:
        import traceback

        tb = "".join(traceback.format_exception(result.exception)) if result.exception else ""
        pytest.fail(
            f"llm2clip-vlm {' '.join(argv)} exited {result.exit_code}:\n{result.output[-3000:]}\n{tb}"
        )
    return result.output


def sets(items: list[str]) -> list[str]:
    return [f"--set={x}" for x in items]


def _metrics(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------
def test_every_recipe_has_a_run() -> None:
    found = {p.name for p in RECIPES.iterdir() if p.is_file()} | {demo_recipe_path().name}
    assert found == set(RUN_BY), f"recipes without a run in this file: {sorted(found - set(RUN_BY))}"
    tests = {name for name in globals() if name.startswith("test_")}
    assert set(RUN_BY.values()) <= tests


# What each command printed (stdout and stderr; not a terminal, so progress comes as log lines).
OUTPUT: dict[str, str] = {}


@pytest.fixture(scope="module")
def stage1_run(world: Path) -> Path:
    """``stage1-llama3-8b.yaml`` as its header says: ``-o runs/cc-8b`` (the stage-2 recipes' encoder)."""
    cwd = Path.cwd()
    os.chdir(world)
    try:
        OUTPUT["stage1"] = cli(
            "stage1", str(RECIPES / "stage1-llama3-8b.yaml"), "-o", "runs/cc-8b", *sets(S1)
        )
    finally:
        os.chdir(cwd)
    return world / "runs" / "cc-8b"


def test_stage1_recipe_on_img2dataset_folder(stage1_run: Path) -> None:
    m = _metrics(stage1_run / "metrics.json")
    assert m["train"]["steps"] == 2 and m["train"]["global_batch"] == 4 and len(m["train"]["losses"]) == 2
    # DreamLIP has one shortSV caption per image: CRA pairs COCO's short captions (8 images x 2).
    cra = m["eval"]
    assert cra["cra_set"] == "coco" and cra["cra_from_training_data"] is False and cra["captions"] == 16
    assert m["data"]["train"] == {"records": 40, "skipped": 0}
    assert (stage1_run / "encoder" / "config.json").is_file()
    # The reference route: LLM2Vec's adapters merged, MNTP, then E5 (9 records a task) + captions.
    assert "LoRA modules of McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp-supervised" in OUTPUT["stage1"]
    assert re.search(r"stage 1 MNTP: step 2/2", OUTPUT["stage1"])
    tasks = m["details"]["tasks"]
    assert tasks["allnli"] == {"samples": 9, "batches": 2} and len(tasks) == 15
    assert tasks["cc3m"] == {"samples": 40, "batches": 10}
    assert re.search(
        r"stage 1 SimCSE: step 2/2 \(100%\)  loss \d+\.\d+ .*(s/step|steps/s), elapsed", OUTPUT["stage1"]
    )


@pytest.mark.slow  # a 4-bit (bitsandbytes) base on the CPU, then a bf16 reload for the merge
def test_stage1_qlora_recipe(in_world: Path) -> None:
    # Its header's import-encoder command, on the stand-ins (the base + LLM2Vec's two adapters).
    cli("import-encoder", LLAMA3, "--adapter", LLM2VEC_ADAPTERS[0], "--adapter", LLM2VEC_ADAPTERS[1],
        "-o", "checkpoints/llm2vec-llama3-8b")  # fmt: skip
    cli("stage1", str(RECIPES / "stage1-llama3-8b-qlora.yaml"), "-o", "runs/cc-8b-qlora", *sets(S1))
    m = _metrics(in_world / "runs/cc-8b-qlora/metrics.json")
    assert m["train"]["steps"] == 2 and m["eval"]["cra_set"] == "coco"


@pytest.fixture(scope="module")
def store(world: Path, stage1_run: Path) -> Path:
    """``embed`` on the openai recipe's data with the stage-1 encoder (``runs/store``)."""
    cwd = Path.cwd()
    os.chdir(world)
    try:
        recipe = RECIPES / "stage2-openai-clip-vit-l-14-336.yaml"
        OUTPUT["embed"] = cli(
            "embed", str(recipe), "-o", "runs/store", "--set=embed.encoder=runs/cc-8b/encoder"
        )
    finally:
        os.chdir(cwd)
    return world / "runs" / "store"


@pytest.fixture(scope="module")
def tower(world: Path, store: Path) -> Path:
    """Stage 2 (openai CLIP recipe) and its export to the tower path the LLaVA recipes name."""
    cwd = Path.cwd()
    os.chdir(world)
    try:
        recipe = str(RECIPES / "stage2-openai-clip-vit-l-14-336.yaml")
        OUTPUT["stage2"] = cli("stage2", recipe, "--store", "runs/store", "--encoder", "runs/cc-8b/encoder",
                               "-o", "runs/stage2-clip-l336", *sets(S2))  # fmt: skip
        cli("export-tower", "runs/stage2-clip-l336", "-o", "runs/llm2clip-clip-l336/tower")
    finally:
        os.chdir(cwd)
    return world / "runs" / "llm2clip-clip-l336" / "tower"


def test_stage2_openai_clip_recipe_and_export(world: Path, store: Path, tower: Path) -> None:
    from transformers import CLIPVisionModel

    stores = sorted(p.name for p in store.iterdir() if p.is_dir())
    assert stores == ["heldout-coco", "heldout-docci", "heldout-flickr30k", "heldout-urban1k", "train"]
    m = _metrics(world / "runs/stage2-clip-l336/metrics.json")
    assert m["train"]["steps"] == 2
    retrieval = m["eval"]["after"]
    assert set(retrieval) == {"coco", "flickr30k", "urban1k", "docci"}
    assert (retrieval["coco"]["n_images"], retrieval["coco"]["n_captions"]) == (8, 40)  # 5 per image
    assert (retrieval["docci"]["n_images"], retrieval["docci"]["n_captions"]) == (8, 8)
    assert CLIPVisionModel.from_pretrained(tower).config.hidden_size == 32
    # Progress as log lines: the store's captions, the training steps.
    # (40 CC3M + 20 CC12M images) x (shortSV + longSV): no raw_caption, as the reference.
    assert re.search(r"embed train: caption 120/120 \(100%\)  .*\|  .*, done", OUTPUT["embed"])
    assert re.search(r"stage 2: step 2/2 \(100%\)  loss \d+\.\d+ .*\|  .*, done", OUTPUT["stage2"])


@pytest.mark.slow  # its own stage 2 (~15 s idle, ~40 s on a loaded 2-core machine)
def test_stage2_siglip_recipe_streamed(in_world: Path, store: Path) -> None:
    """The SigLIP2 recipe streaming its two img2dataset folders (the store of the same data)."""
    recipe = str(RECIPES / "stage2-siglip2-so400m.yaml")
    cli("stage2", recipe, "--store", "runs/store", "--encoder", "runs/cc-8b/encoder",
        "-o", "runs/stage2-siglip2", *sets([*S2, "data.stream=true", "data.shuffle_buffer=8", "stage2.embed_dim=32"]))  # fmt: skip
    # (no image head: the shared width is the stand-in tower's, 32)
    metrics = _metrics(in_world / "runs/stage2-siglip2/metrics.json")
    m = metrics
    assert m["train"]["steps"] == 2 and set(m["eval"]["after"]) == {"coco", "flickr30k", "urban1k", "docci"}
    assert {k: v["records"] for k, v in metrics["data"]["train"]["sets"].items()} == {"cc3m": 40, "cc12m": 20}
    assert "- path: data/cc12m" in (in_world / "runs/stage2-siglip2/config.yaml").read_text()


def test_stage2_eva02_recipe(in_world: Path, store: Path) -> None:
    pytest.importorskip("timm", reason="timm is not installed (pip install 'llm2clip-vlm[timm]')")
    write_timm_eva(in_world)
    assert (in_world / EVA02 / "config.json").is_file()
    cli("stage2", str(RECIPES / "stage2-eva02-l-14-336.yaml"), "--store", "runs/store",
        "--encoder", "runs/cc-8b/encoder", "-o", "runs/stage2-eva02-l336", *sets(S2))  # fmt: skip
    assert _metrics(in_world / "runs/stage2-eva02-l336/metrics.json")["train"]["steps"] == 2


@pytest.mark.slow  # pretrain + full finetune of a tiny Vicuna-style Llama in bf16 on the CPU
def test_llava_clip_baseline_recipe(in_world: Path) -> None:
    recipe = str(RECIPES / "llava15-7b-clip-vit-l-14-336.yaml")
    out = cli("llava-pretrain", recipe, "-o", "runs/llava15-clip/pretrain", *sets(_llava("pretrain")))
    assert re.search(r"llava pretrain: step 2/2 \(100%\)  loss \d+\.\d+ .*\|  .*, done", out)
    cli("llava-finetune", recipe, "--from", "runs/llava15-clip/pretrain", "-o", "runs/llava15-clip/finetune",
        *sets(_llava("finetune")))  # fmt: skip
    m = _metrics(in_world / "runs/llava15-clip/finetune/metrics.json")
    assert (
        m["train"]["steps"] == 2
        and m["details"]["tune"] == "full"
        and m["details"]["template"] == "vicuna_v1"
    )
    assert (in_world / "runs/llava15-clip/finetune/model/config.json").is_file()


@pytest.mark.slow  # pretrain, full finetune and LoRA finetune on the exported LLM2CLIP tower
def test_llava_llm2clip_recipes(in_world: Path, tower: Path) -> None:
    recipe = str(RECIPES / "llava15-7b-llm2clip.yaml")
    pre = "runs/llava15-llm2clip/pretrain"
    cli("llava-pretrain", recipe, "-o", pre, *sets(_llava("pretrain")))
    cli(
        "llava-finetune",
        recipe,
        "--from",
        pre,
        "-o",
        "runs/llava15-llm2clip/finetune",
        *sets(_llava("finetune")),
    )
    lora = str(RECIPES / "llava15-7b-llm2clip-lora.yaml")
    cli(
        "llava-finetune",
        lora,
        "--from",
        pre,
        "-o",
        "runs/llava15-llm2clip/finetune-lora",
        *sets(_llava("finetune")),
    )
    assert _metrics(in_world / f"{pre}/metrics.json")["details"]["tune"] == "projector"
    assert _metrics(in_world / "runs/llava15-llm2clip/finetune/metrics.json")["details"]["tune"] == "full"
    m = _metrics(in_world / "runs/llava15-llm2clip/finetune-lora/metrics.json")
    assert m["train"]["steps"] == 2 and m["details"]["tune"] == "lora"


@pytest.mark.slow  # import a released-layout tower, then pretrain + finetune on it
def test_llava_released_tower_recipe(in_world: Path) -> None:
    from test_import_tower import released_tower

    # The recipe's own commands: download (here: a tiny checkpoint in the release's hub layout),
    # import-tower into the path the recipe names, then the two LLaVA phases.
    released_tower(in_world / "checkpoints/LLM2CLIP-Openai-L-14-336")
    cli("import-tower", "checkpoints/LLM2CLIP-Openai-L-14-336", "-o",
        "checkpoints/llm2clip-openai-l-14-336-imported")  # fmt: skip
    recipe = str(RECIPES / "llava15-7b-llm2clip-released.yaml")
    pre = "runs/llava15-released/pretrain"
    cli("llava-pretrain", recipe, "-o", pre, *sets(_llava("pretrain")))
    cli("llava-finetune", recipe, "--from", pre, "-o", "runs/llava15-released/finetune",
        *sets(_llava("finetune")))  # fmt: skip
    m = _metrics(in_world / "runs/llava15-released/finetune/metrics.json")
    assert m["train"]["steps"] == 2 and m["details"]["tune"] == "full"


@pytest.mark.slow  # lmms-eval on two tiny LLaVA models, synthetic local task copies (~1 min)
def test_eval_script(world: Path, tmp_path: Path) -> None:
    """``eval-llava15-7b.sh`` as its header says (GPUS=1), on the CPU and offline task copies."""
    from llm2clip_vlm.evaluation.synthetic_tasks import write_eval_data
    from llm2clip_vlm.evaluation.tiny import save_tiny_llava

    write_eval_data(tmp_path / "tasks", seed=2, mme_images_per_category=1, scienceqa=4, vizwiz=4)
    clip, llm2clip = (
        save_tiny_llava(tmp_path / "clip", seed=0),
        save_tiny_llava(tmp_path / "llm2clip", seed=1),
    )
    bin_dir = Path(sys.executable).parent  # the `llm2clip-vlm` console script of this environment
    env = dict(os.environ, HF_HUB_OFFLINE="1", GPUS="1", DEVICE="cpu", PYTHONPATH=str(REPO),
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="200")  # fmt: skip
    cmd = ["bash", str(RECIPES / "eval-llava15-7b.sh"), str(clip), str(llm2clip), str(tmp_path / "out"),
           "--data-dir", str(tmp_path / "tasks"), "--limit", "1", "--dtype", "float32",
           "--model-args", "max_new_tokens=4"]  # fmt: skip
    r = subprocess.run(cmd, cwd=world, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"llm2clip_llava generate: request \d+/\d+ \(100%\)", r.stderr)  # progress lines
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["rows"]) == {"clip", "llm2clip"}
    for metrics in summary["rows"].values():
        assert set(metrics) == {"MME perception", "SQA-IMG", "VizWiz"}
    assert "1505.8" in (tmp_path / "out" / "comparison.md").read_text()  # the paper's row is beside ours


DEMO_SIZES = [
    "stage1.model=meta-llama/Meta-Llama-3-8B-Instruct", "data.demo_train_images=40",
    "data.demo_heldout_images=16", "stage1.loop.max_steps=2", "stage1.batch_size=4", "embed.batch_size=32",
    "stage2.batch_size=8", "stage2.loop.max_steps=2", "stage2.num_workers=0", "stage2.eval_batch_size=32",
]  # fmt: skip


@pytest.mark.slow  # build-tower (stage 1, embed, stage 2, export), then LLaVA pretrain + finetune
def test_demo_recipe_end_to_end(in_world: Path) -> None:
    from llm2clip_vlm.data.synthetic_llava import write_llava_demo

    cli("build-tower", "-o", "runs/demo", *sets(DEMO_SIZES))
    m = _metrics(in_world / "runs/demo/metrics.json")
    assert m["stage1"]["train"]["steps"] == 2 and m["stage1"]["eval"]["cra_set"] == "short"
    assert set(m["stage2"]["eval"]["after"]) == {"short", "long"}
    # The demo's LLaVA splits, written small where the command looks for them.
    write_llava_demo(in_world / "runs/demo-llava/pretrain/demo-llava", pretrain_images=8, instruct_images=8,
                     heldout_images=4, image_size=32)  # fmt: skip
    write_llava_demo(in_world / "runs/demo-llava/finetune/demo-llava", pretrain_images=8, instruct_images=8,
                     heldout_images=4, image_size=32)  # fmt: skip
    llm = ["llava.llm=checkpoints/vicuna-7b-v1.5"]
    cli("llava-pretrain", "-o", "runs/demo-llava/pretrain", *sets(llm + _llava("pretrain")))
    cli("llava-finetune", "--from", "runs/demo-llava/pretrain", "-o", "runs/demo-llava/finetune",
        *sets(llm + _llava("finetune")))  # fmt: skip
    m = _metrics(in_world / "runs/demo-llava/finetune/metrics.json")
    assert m["train"]["steps"] == 2 and m["eval"]["after"]["n"] == 4


@pytest.mark.slow  # 2 CPU processes through accelerate launch (~30 s)
def test_ddp_launcher_config_with_two_cpu_processes(world: Path, store: Path, tower: Path) -> None:
    """``recipes/accelerate/ddp-8gpu.yaml`` as the stage-2 recipe's header says, on 2 CPU processes."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(RECIPES / "accelerate" / "ddp-8gpu.yaml"), "--num_processes", "2", "--main_process_port",
        str(free_port()), "-m", "llm2clip_vlm.cli", "stage2", str(RECIPES / "stage2-openai-clip-vit-l-14-336.yaml"),
        "--store", "runs/store", "--encoder", "runs/cc-8b/encoder", "-o", "runs/stage2-ddp", *sets(S2),
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=world, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = _metrics(world / "runs/stage2-ddp/metrics.json")
    one = _metrics(world / "runs/stage2-clip-l336/metrics.json")
    assert two["train"]["processes"] == 2 and one["train"]["processes"] == 1
    # Same global batch, local-loss formulation: 2 processes compute the 1-process loss (bf16 noise).
    assert two["train"]["losses"] == pytest.approx(one["train"]["losses"], abs=2e-3)


@pytest.mark.slow  # import a SigLIP2-layout tower, then pretrain + finetune on it
def test_llava_siglip2_released_tower_recipe(in_world: Path) -> None:
    from test_import_tower_families import SIG, siglip_release

    # The recipe's commands on a tiny stand-in of the release (width 32, so --heads is given; the
    # real so400m tower's 16 heads are the default).
    siglip_release(in_world / "checkpoints/LLM2CLIP-Llama3.1-8B-siglip2-so400m-patch14-224")
    cli("import-tower", "checkpoints/LLM2CLIP-Llama3.1-8B-siglip2-so400m-patch14-224", "-o",
        "checkpoints/llm2clip-siglip2-so400m-224-imported", "--heads", str(SIG["heads"]))  # fmt: skip
    recipe = str(RECIPES / "llava15-7b-llm2clip-siglip2-so400m-224.yaml")
    pre = "runs/llava15-siglip2/pretrain"
    cli("llava-pretrain", recipe, "-o", pre, *sets(_llava("pretrain")))
    cli("llava-finetune", recipe, "--from", pre, "-o", "runs/llava15-siglip2/finetune",
        *sets(_llava("finetune")))  # fmt: skip
    m = _metrics(in_world / "runs/llava15-siglip2/finetune/metrics.json")
    assert m["train"]["steps"] == 2 and m["details"]["tune"] == "full"


# haotian-liu/LLaVA scripts/v1_5/pretrain.sh and finetune.sh (c121f04), transcribed: every flag
# but the model, data and output paths, which the EVA02 recipe fills in (report_to: see its header).
LLAVA15_PRETRAIN = {
    "--deepspeed": "./scripts/zero2.json", "--version": "plain", "--mm_projector_type": "mlp2x_gelu",
    "--tune_mm_mlp_adapter": "True", "--mm_vision_select_layer": "-2", "--mm_use_im_start_end": "False",
    "--mm_use_im_patch_token": "False", "--bf16": "True", "--num_train_epochs": "1",
    "--per_device_train_batch_size": "32", "--per_device_eval_batch_size": "4",
    "--gradient_accumulation_steps": "1", "--evaluation_strategy": "no", "--save_strategy": "steps",
    "--save_steps": "24000", "--save_total_limit": "1", "--learning_rate": "1e-3", "--weight_decay": "0.",
    "--warmup_ratio": "0.03", "--lr_scheduler_type": "cosine", "--logging_steps": "1", "--tf32": "True",
    "--model_max_length": "2048", "--gradient_checkpointing": "True", "--dataloader_num_workers": "4",
    "--lazy_preprocess": "True", "--report_to": "none",
}  # fmt: skip
LLAVA15_FINETUNE = {
    **{k: v for k, v in LLAVA15_PRETRAIN.items() if k != "--tune_mm_mlp_adapter"},
    "--deepspeed": "./scripts/zero3.json", "--version": "v1", "--image_aspect_ratio": "pad",
    "--group_by_modality_length": "True", "--per_device_train_batch_size": "16", "--save_steps": "50000",
    "--learning_rate": "2e-5",
}  # fmt: skip


def test_eva02_recipe_runs_llavas_scripts_through_the_shim(tmp_path: Path) -> None:
    tower, llava = tmp_path / "imported" / "tower", tmp_path / "LLaVA"
    tower.mkdir(parents=True)
    (tower / "config.json").write_text('{"architecture": "eva02_large_patch14_clip_336"}')
    llava.mkdir()
    log = tmp_path / "calls.txt"
    fake = tmp_path / "deepspeed"  # records its argv and working directory, one line per call
    fake.write_text(f'#!/usr/bin/env bash\necho "$PWD|$*" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, LLAVA_DIR=str(llava), DEEPSPEED=str(fake))
    script = RECIPES / "llava15-7b-llm2clip-eva02-l-14-336.sh"
    r = subprocess.run(["bash", str(script), str(tower), "llm", "out", "data"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = [line.split("|", 1) for line in log.read_text().splitlines()]
    assert [cwd for cwd, _ in calls] == [str(llava)] * 2
    for (_, argv), expected, phase in zip(
        calls, (LLAVA15_PRETRAIN, LLAVA15_FINETUNE), ("pretrain", "finetune"), strict=True
    ):
        words = argv.split()
        assert words[:3] == ["--module", "llm2clip_vlm.adapters.llava.patch", "llava/train/train_mem.py"]
        flags = dict(zip(words[3::2], words[4::2], strict=True))
        paths = {"--model_name_or_path": str(tmp_path / "llm"), "--vision_tower": f"llm2clip:{tower}",
                 "--output_dir": str(tmp_path / "out" / phase)}  # fmt: skip
        if phase == "pretrain":
            paths |= {"--data_path": str(tmp_path / "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"),
                      "--image_folder": str(tmp_path / "data/LLaVA-Pretrain/images")}  # fmt: skip
        else:
            paths |= {"--data_path": str(tmp_path / "data/llava_v1_5_mix665k.json"),
                      "--image_folder": str(tmp_path / "data"),
                      "--pretrain_mm_mlp_adapter": str(tmp_path / "out/pretrain/mm_projector.bin")}  # fmt: skip
        assert flags == {**expected, **paths}

    bad = subprocess.run(
        ["bash", str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "no config.json" in bad.stderr
