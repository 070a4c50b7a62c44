"""The ``llm2clip-vlm`` command line (typer). Commands parse arguments and delegate.

Every training command takes an optional RECIPE (YAML; without one, the embedded demo recipe),
``--output DIR`` and any number of ``--set section.key=value`` overrides. Heavy modules are
imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from llm2clip_vlm import configuration
from llm2clip_vlm.config import RunConfig, apply_runtime

app = typer.Typer(
    name="llm2clip-vlm",
    help="Train an LLM2CLIP vision tower end to end and use it as a LLaVA-1.5 vision encoder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

console = Console(stderr=True)

RecipeArg = Annotated[
    Path | None,
    typer.Argument(help="Recipe YAML (only what differs from the defaults). Default: the embedded demo."),
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Output directory of the run.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable)."),
]


def demo_recipe_path() -> Path:
    """The embedded default recipe (the synthetic demo on a CPU)."""
    return Path(str(resources.files("llm2clip_vlm") / "recipes" / "demo.yaml"))


def resolve_config(recipe: Path | None, overrides: list[str] | None) -> RunConfig:
    """Defaults <- recipe (or the embedded demo recipe) <- ``--set`` overrides."""
    try:
        cfg = configuration.load(RunConfig, recipe or demo_recipe_path(), overrides or [])
        apply_runtime(cfg.runtime)
    except ValueError as e:  # ConfigError, or a value apply_runtime refuses
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from e
    return cfg


def _not_built(command: str, issue: str) -> None:
    console.print(f"[yellow]`llm2clip-vlm {command}` is not built yet[/yellow] ({issue}). Nothing was run.")
    raise typer.Exit(3)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic data set into.")],
    seed: Annotated[int, typer.Option(help="Random seed (the data set is deterministic per seed).")] = 0,
    train_images: Annotated[int, typer.Option(help="Images in the training split.")] = 4000,
    heldout_images: Annotated[int, typer.Option(help="Images in each held-out split.")] = 1000,
    image_size: Annotated[int, typer.Option(help="Side of the square images in pixels.")] = 64,
) -> None:
    """Write the synthetic image-caption world (train + held-out splits) in real-data formats."""
    from llm2clip_vlm.data.synthetic import write_demo_dataset

    summary = write_demo_dataset(
        out, seed=seed, train_images=train_images, heldout_images=heldout_images, image_size=image_size
    )
    console.print(summary)


@app.command("stage1")
def stage1(recipe: RecipeArg = None, output: OutputOpt = Path("runs/stage1"), set_: SetOpt = None) -> None:
    """Stage 1: make a decoder LLM a caption embedder (bidirectional, MNTP, supervised SimCSE)."""
    from llm2clip_vlm.text.train import run_stage1

    cfg = resolve_config(recipe, set_)
    metrics = run_stage1(cfg, output)
    if metrics:  # empty on non-main processes
        console.print(
            f"stage 1: CRA {metrics['cra_before']:.1f} -> {metrics['cra_after']:.1f} "
            f"({metrics['steps']} steps, {metrics['train_seconds']:.0f} s); embedder in {metrics['encoder']}"
        )


@app.command("embed")
def embed(recipe: RecipeArg = None, output: OutputOpt = Path("runs/store"), set_: SetOpt = None) -> None:
    """Encode every caption once with a stage-1 embedder into the embedding store.

    Writes ``OUTPUT/train`` and ``OUTPUT/heldout-<name>`` (one store per split) and
    ``OUTPUT/config.yaml``; a killed run continues from its last complete shard.
    """
    from rich.table import Table

    from llm2clip_vlm.store.run import MissingEncoderError, run_embed
    from llm2clip_vlm.store.store import StoreInputError, StoreMismatchError

    cfg = resolve_config(recipe, set_)
    try:
        summary = run_embed(cfg, output)
    except MissingEncoderError as e:
        console.print(f"[red]embed:[/red] {e}")
        raise typer.Exit(2) from e
    except (StoreInputError, StoreMismatchError, FileNotFoundError) as e:
        console.print(f"[red]embed:[/red] {e}")
        raise typer.Exit(1) from e
    if not summary:  # non-main processes
        return
    table = Table(title=f"embedding stores in {output}")
    for col in ("store", "images", "captions", "dim", "dtype", "shards", "padding"):
        table.add_column(col, justify="left" if col == "store" else "right")
    for name, s in summary.items():
        table.add_row(
            name,
            str(s["images"]),
            str(s["rows"]),
            str(s["dim"]),
            s["dtype"],
            str(s["shards"]),
            f"{100 * s['padding_share']:.1f}%",
        )
    console.print(table)


@app.command("stage2")
def stage2(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/stage2"),
    store: Annotated[
        Path, typer.Option(help="The `embed` output (train/ and heldout-<name>/ stores).")
    ] = Path("runs/store"),
    encoder: Annotated[
        Path | None,
        typer.Option(help="The stage-1 CaptionEncoder (default: embed.encoder of the config)."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Stage 2: align a CLIP vision encoder to the frozen LLM through stored caption embeddings."""
    from llm2clip_vlm.vision.train import run_stage2

    cfg = resolve_config(recipe, set_)
    run_stage2(cfg, output, store_dir=store, encoder_dir=encoder)


@app.command("export-tower")
def export_tower(
    run: Annotated[Path, typer.Argument(help="A stage-2 run directory.")],
    output: OutputOpt = Path("runs/tower"),
    model_output: Annotated[
        Path | None,
        typer.Option(
            "--model-output", help="Where the full retrieval model goes (default: OUTPUT/../model)."
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="fp32 | bf16 | fp16 (default: the run's export.dtype).")
    ] = None,
) -> None:
    """Export the stage-2 vision encoder in its own transformers format (a LLaVA vision tower)."""
    from llm2clip_vlm.vision.export import export_tower as do_export

    do_export(run, output, model_dir=model_output, dtype=dtype)
    console.print(f"tower: {output}")


@app.command("build-tower")
def build_tower(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/build-tower"),
    set_: SetOpt = None,
    from_stage: Annotated[
        str | None, typer.Option(help="Rerun from this stage: stage1 | embed | stage2 | export.")
    ] = None,
) -> None:
    """Stage 1, embed, stage 2 and export in one command (stages whose artifact matches are skipped)."""
    from llm2clip_vlm.pipeline import STAGES, print_metrics, run_build_tower

    if from_stage is not None and from_stage not in STAGES:
        console.print(f"[red]--from-stage must be one of {', '.join(STAGES)}[/red], got {from_stage!r}")
        raise typer.Exit(2)
    cfg = resolve_config(recipe, set_)
    metrics = run_build_tower(cfg, output, from_stage=from_stage)
    print_metrics(metrics, output)


@app.command("llava-pretrain")
def llava_pretrain(
    recipe: RecipeArg = None, output: OutputOpt = Path("runs/llava-pretrain"), set_: SetOpt = None
) -> None:
    """LLaVA-1.5 projector pretraining on top of a tower."""
    _not_built("llava-pretrain", "issue 5")


@app.command("llava-finetune")
def llava_finetune(
    recipe: RecipeArg = None, output: OutputOpt = Path("runs/llava-finetune"), set_: SetOpt = None
) -> None:
    """LLaVA-1.5 instruction tuning (full, LoRA or QLoRA)."""
    _not_built("llava-finetune", "issue 5")


@app.command("eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="A LLaVA model directory.")],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated lmms-eval tasks.")
    ] = "mme,scienceqa_img,vizwiz_vqa_val",
) -> None:
    """Evaluate a VLM with lmms-eval (MME, ScienceQA-IMG, VizWiz)."""
    _not_built("eval", "issue 6")


@app.command("bench")
def bench(
    suite: Annotated[str, typer.Argument(help="stage1 | embed | stage2 | tower | llava")],
    preset: Annotated[
        str | None, typer.Option(help="The suite's preset (tower: tiny, tiny-siglip, vit-l-14-336).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: the preset's).")
    ] = None,
    warmup: Annotated[
        int | None, typer.Option(help="Warm-up calls per variant (default: the preset's).")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Timed calls per variant (default: the preset's).")
    ] = None,
) -> None:
    """Benchmarks: time per call and peak memory of a hot loop, after warm-up, over interleaved repeats."""
    from llm2clip_vlm.bench import SuiteNotBuilt, run_suite
    from llm2clip_vlm.bench.harness import render

    try:
        report = run_suite(suite, preset, device=device, warmup=warmup, repeats=repeats)
    except SuiteNotBuilt as e:
        console.print(f"[yellow]{e}[/yellow]. Nothing was run.")
        raise typer.Exit(3) from e
    except (ValueError, RuntimeError) as e:
        console.print(f"[red]bench {suite}:[/red] {e}")
        raise typer.Exit(2) from e
    print(render(report, json_out))


def main() -> None:
    """Console-script entry point."""
    # Our own rich bars show progress; transformers' per-file tqdm bars would only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        console.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
