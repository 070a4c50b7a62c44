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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from llm2clip_vlm.allocator import keep_freed_memory
from llm2clip_vlm.errors import Terminated, exit_on_sigterm

if __name__ == "__main__" or Path(sys.argv[0]).name == "llm2clip-vlm":
    exit_on_sigterm(at_start=True)  # a SIGTERM while the modules below load is one line too

from llm2clip_vlm import config_io  # noqa: E402
from llm2clip_vlm.progress import configure_lines  # noqa: E402
from llm2clip_vlm.recipe import RunConfig, RuntimeConfig  # noqa: E402

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
AllowChangeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-config-change",
        help="Resume a run whose config differs (beyond speed settings) from the one it was started with.",
    ),
]
RestartOpt = Annotated[
    bool,
    typer.Option(
        "--restart",
        help="Start over: discard this command's earlier run in --output (checkpoints, results) "
        "instead of resuming it; needed when its inputs or config changed.",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: section.key=value (repeatable)."),
]
PushOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        metavar="REPO",
        help="Also upload the model directory (with its model card) to this hub repo, with your own "
        "credentials (hf auth login / HF_TOKEN).",
    ),
]


def demo_recipe_path() -> Path:
    """The embedded default recipe (the synthetic demo on a CPU)."""
    return Path(str(resources.files("llm2clip_vlm") / "recipes" / "demo.yaml"))


def apply_runtime(runtime: RuntimeConfig) -> None:
    """Apply the process settings of a command's config: torch's CPU threads, progress lines."""
    if runtime.threads < 0:
        raise ValueError(f"runtime.threads must be >= 0, got {runtime.threads}")
    configure_lines(runtime.progress_seconds, runtime.progress_steps)
    if runtime.threads:
        import torch

        torch.set_num_threads(runtime.threads)


def resolve_config(recipe: Path | None, overrides: list[str] | None) -> RunConfig:
    """Defaults <- recipe (or the embedded demo recipe) <- ``--set`` overrides; then the command
    applies the config's runtime settings to this process (reading a recipe alone never does)."""
    try:
        cfg = config_io.load(RunConfig, recipe or demo_recipe_path(), overrides or [])
        apply_runtime(cfg.runtime)
    except ValueError as e:  # ConfigError, or a value apply_runtime refuses
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from e
    return cfg


def _push(folder: Path, repo: str | None) -> None:
    """``--push-to-hub``: upload ``folder``; a failure is one line and leaves the finished run alone."""
    if not repo:
        return
    from llm2clip_vlm.hub.push import PushError, push_to_hub

    try:
        url = push_to_hub(folder, repo)
    except PushError as e:
        console.print(f"[red]push-to-hub:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from e
    except Exception as e:  # network, credentials, permissions: the hub client says which
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        console.print(
            f"[red]push-to-hub {repo}:[/red] {escape(first)} (the run's files are intact)", soft_wrap=True
        )
        raise typer.Exit(1) from e
    console.print(f"pushed {folder} to {repo}: {url}", soft_wrap=True)


def _report_and_logs(output: Path, runs: list[Path]) -> None:
    """Write ``OUTPUT/report.html`` from the run(s) and say where it and the TensorBoard logs are."""
    from llm2clip_vlm.reports import NotARunError, load_runs, write_report

    try:
        path = write_report(load_runs(runs), output / "report.html")
        console.print(f"report: {path}", soft_wrap=True)
    except (NotARunError, OSError, ValueError) as e:  # never costs the finished run
        console.print(f"[yellow]report not written:[/yellow] {escape(str(e))}", soft_wrap=True)
    boards = sorted({p.parent for run in runs for p in run.glob("**/tensorboard/events.out.tfevents.*")})
    if boards:
        console.print(
            f"TensorBoard logs: {', '.join(map(str, boards))}  (tensorboard --logdir {output})",
            soft_wrap=True,
        )


def claimed_output(
    output: Path,
    command: str,
    cfg: RunConfig | None,
    allow_config_change: bool = False,
    restart: bool = False,
    started: bool = False,
) -> Any:
    """Context: refuse an --output that is a file, another command's run, a run with another
    config or one another process writes; lock it and record the owner in run.json at once,
    undone if the command is refused before it starts (see llm2clip_vlm.run_dir)."""
    from llm2clip_vlm.run_dir import claimed

    return claimed(
        output, command, cfg, allow_config_change=allow_config_change, restart=restart, started=started
    )


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write the synthetic data set into.")],
    seed: Annotated[int, typer.Option(help="Random seed (the data set is deterministic per seed).")] = 0,
    train_images: Annotated[int, typer.Option(min=1, help="Images in the training split.")] = 4000,
    heldout_images: Annotated[int, typer.Option(min=0, help="Images in each held-out split.")] = 1000,
    image_size: Annotated[
        int | None,
        typer.Option(
            min=8, help="Side of the square images in pixels (default 64 shapes, 96 glyphs and posters)."
        ),
    ] = None,
    world: Annotated[
        str,
        typer.Option(
            help="'shapes' (the demo world), 'glyphs' (letters and digits on patterns) or 'posters' "
            "(tilted, jittered glyphs on saturated striped/checkered grounds)."
        ),
    ] = "shapes",
) -> None:
    """Write the synthetic image-caption world (train + held-out splits) in real-data formats."""
    from llm2clip_vlm.data.synthetic import write_demo_dataset
    from llm2clip_vlm.data.synthetic_glyphs import write_glyph_dataset
    from llm2clip_vlm.data.synthetic_posters import write_poster_dataset

    writers = {"shapes": write_demo_dataset, "glyphs": write_glyph_dataset, "posters": write_poster_dataset}
    if world not in writers:
        console.print(f"[red]demo-data:[/red] --world must be one of {', '.join(writers)}, got {world!r}")
        raise typer.Exit(2)
    write = writers[world]
    size = image_size or (64 if world == "shapes" else 96)
    summary = write(out, seed=seed, train_images=train_images, heldout_images=heldout_images, image_size=size)
    console.print(summary)


@app.command("stage1")
def stage1(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/stage1"),
    set_: SetOpt = None,
    allow_config_change: AllowChangeOpt = False,
    restart: RestartOpt = False,
) -> None:
    """Stage 1: make a decoder LLM a caption embedder (bidirectional, MNTP, supervised SimCSE)."""
    from llm2clip_vlm.commands import run_stage1

    cfg = resolve_config(recipe, set_)
    with claimed_output(output, "stage1", cfg, allow_config_change, restart) as claim:
        metrics = run_stage1(cfg, output, claim=claim)
    if metrics:  # empty on non-main processes
        cra, train = metrics["eval"], metrics["train"]
        console.print(
            f"stage 1: CRA {cra['before']:.1f} -> {cra['after']:.1f} "
            f"on {_cra_where(cra)} ({train['steps']} steps, {train['seconds']:.0f} s); "
            f"embedder in {metrics['details']['encoder']}"
        )


def _cra_where(cra: dict) -> str:
    """Where stage 1 measured CRA (its metrics.json ``eval`` section), for its summary line."""
    if cra.get("cra_from_training_data"):
        return f"{cra.get('cra_held_out_of_training', '?')} training images held out of training"
    return f"held-out set {cra.get('cra_set', '?')!r}"


@app.command("embed")
def embed(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/store"),
    set_: SetOpt = None,
    allow_config_change: AllowChangeOpt = False,
    restart: RestartOpt = False,
) -> None:
    """Encode every caption once with a stage-1 embedder into the embedding store.

    Writes ``OUTPUT/train`` and ``OUTPUT/heldout-<name>`` (one store per split) and
    ``OUTPUT/config.yaml``; a killed run continues from its last complete shard.
    """
    from rich.table import Table

    from llm2clip_vlm.commands import run_embed
    from llm2clip_vlm.store.run import MissingEncoderError
    from llm2clip_vlm.store.store import StoreInputError, StoreMismatchError

    cfg = resolve_config(recipe, set_)
    try:
        with claimed_output(output, "embed", cfg, allow_config_change, restart) as claim:
            summary = run_embed(cfg, output, claim=claim)
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


@app.command("verify-store")
def verify_store(
    store: Annotated[Path, typer.Argument(help="an embedding store directory (e.g. runs/store/train)")],
) -> None:
    """Re-hash every shard and check every table of an embedding store (what opening skips at scale).

    Opening a large store checks sizes, shapes and a sample of rows only; run this after copying a
    store, or when in doubt. Exit 1 with one line naming what differs.
    """
    from llm2clip_vlm.store.store import EmbeddingStore, StoreMismatchError

    try:
        opened = EmbeddingStore.open(store, verify_checksums=True)
    except StoreMismatchError as e:
        console.print(f"[red]verify-store:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from e
    console.print(
        f"{store}: ok ({opened.num_images} images, {opened.num_rows} captions, "
        f"{len(opened.manifest['shards'])} shards re-hashed)",
        soft_wrap=True,
    )


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
    allow_config_change: AllowChangeOpt = False,
    restart: RestartOpt = False,
) -> None:
    """Stage 2: align a CLIP vision encoder to the frozen LLM through stored caption embeddings."""
    from llm2clip_vlm.commands import run_stage2

    cfg = resolve_config(recipe, set_)
    with claimed_output(output, "stage2", cfg, allow_config_change, restart) as claim:
        run_stage2(cfg, output, store_dir=store, encoder_dir=encoder, claim=claim)
        claim.record_outputs(["model"])  # what export-tower checks before exporting it


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
    push_to_hub: PushOpt = None,
) -> None:
    """Export the stage-2 vision encoder in its own transformers format (a LLaVA vision tower)."""
    from llm2clip_vlm.commands import run_export as do_export
    from llm2clip_vlm.errors import UserError
    from llm2clip_vlm.run_dir import checked_outputs
    from llm2clip_vlm.training.optim import DTYPES

    if dtype is not None and dtype not in DTYPES:
        console.print(f"[red]export-tower:[/red] --dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        raise typer.Exit(2)
    if not (run / "model").is_dir():  # before --output is created
        raise UserError(f"{run} is not a finished stage-2 run (no model/ folder): give a `stage2` --output")
    checked_outputs(run, "stage-2 run")  # its model/ as it was written, else refused (nothing created)
    with claimed_output(output, "export-tower", None, started=True):
        do_export(run, output, model_dir=model_output, dtype=dtype)
    console.print(f"tower: {output}")
    _push(output, push_to_hub)


# -- importers of the released LLM2CLIP models (llm2clip_vlm/imports) --------------------------
def _run_import(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run an importer; a refused input is one line naming the file and key (exit 1)."""
    from llm2clip_vlm.imports.checkpoint import ImportRefused

    try:
        return fn(*args, **kwargs)
    except (ImportRefused, FileNotFoundError) as e:
        console.print(f"[red]import refused:[/red] {escape(str(e))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from e


@app.command("import-tower")
def import_tower(
    source: Annotated[Path, typer.Argument(help="A downloaded release, e.g. LLM2CLIP-Openai-L-14-336/.")],
    output: OutputOpt = Path("runs/imported-tower"),
    dtype: Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 (default: as released).")] = None,
    heads: Annotated[
        int | None,
        typer.Option(help="Attention heads of an EVA02/SigLIP2 tower (default: the releases' 16)."),
    ] = None,
) -> None:
    """Convert a released LLM2CLIP tower (OpenAI ViT-L, EVA02-L-14-336, SigLIP2 so400m) into OUTPUT/tower.

    All: OUTPUT/tower + OUTPUT/model (stage 2). OpenAI: tower = CLIPVisionModel; EVA02: timm's
    format; SigLIP2: a SiglipVisionModel; both + OUTPUT/heads (head, adaptor, scale).
    """
    from llm2clip_vlm.imports.tower import DTYPES
    from llm2clip_vlm.imports.tower import import_tower as do_import

    if dtype is not None and dtype not in DTYPES:
        console.print(f"[red]import-tower:[/red] --dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        raise typer.Exit(2)
    summary = _run_import(do_import, source, output, dtype=dtype, num_heads=heads)
    console.print(
        f"tower: {summary['tower']}" + (f" ({summary['tower_format']})" if "tower_format" in summary else "")
    )
    if "model" in summary:
        console.print(f"stage-2 checkpoint: {summary['model']}")
    if "heads" in summary:
        console.print(f"released heads: {summary['heads']}")


@app.command("import-encoder")
def import_encoder(
    source: Annotated[
        Path, typer.Argument(help="A llm2vec-style LLM: merged checkpoint, or the base for --adapter.")
    ],
    output: OutputOpt = Path("runs/imported-encoder"),
    adapter: Annotated[
        list[Path] | None,
        typer.Option("--adapter", help="PEFT adapter directory merged onto SOURCE, in order (repeatable)."),
    ] = None,
    caption_template: Annotated[
        str,
        typer.Option(
            help="'auto' (Llama-3 Instruct: the reference's chat header), 'none', or a {text} template."
        ),
    ] = "auto",
    max_length: Annotated[int, typer.Option(min=1, help="Token limit (the reference: 512).")] = 512,
) -> None:
    """Convert a released stage-1 LLM (e.g. LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned) to a CaptionEncoder."""
    from llm2clip_vlm.imports.encoder import import_encoder as do_import

    summary = _run_import(
        do_import,
        source,
        output,
        adapters=adapter or [],
        caption_template=caption_template,
        max_length=max_length,
    )
    console.print(f"caption encoder: {summary['path']} (identity {summary['identity'][:12]})")


@app.command("import-embeddings")
def import_embeddings(
    shards: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image shards (x.tar, or a folder, glob or brace pattern) with x_text_embeddings.tar beside each."
        ),
    ] = None,
    output: OutputOpt = Path("runs/imported-store"),
    encoder: Annotated[
        Path | None,
        typer.Option(help="The CaptionEncoder the side-cars were made with (its identity is recorded)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Store dtype: fp32 | bf16 | fp16.")] = "fp32",
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Import data.train's sets of this recipe (a list: one store, keys SET/KEY).",
        ),
    ] = None,
    set_: SetOpt = None,
    each_a_set: Annotated[
        bool,
        typer.Option(
            "--sets", help="Each SHARDS argument is one set of a list (keys FOLDER/KEY), not one set."
        ),
    ] = False,
) -> None:
    """Read the official *_text_embeddings.tar side-cars into an embedding store.

    One set (SHARDS), several sets (SHARDS... --sets, or --recipe R with data.train as a list):
    one store, rows in the joined order under SET/KEY, as stage 2 reads data.train.
    """
    from llm2clip_vlm.data.config import CaptionSetConfig, train_sets
    from llm2clip_vlm.imports.sidecar import KINDS, import_recipe_sidecars, import_sidecars

    if recipe is not None and shards:
        console.print("[red]import-embeddings:[/red] give SHARDS or --recipe, not both")
        raise typer.Exit(2)
    if recipe is None and not shards:
        console.print("[red]import-embeddings:[/red] give SHARDS (x.tar, a folder, glob) or --recipe R")
        raise typer.Exit(2)
    if recipe is not None:
        cfg = resolve_config(recipe, set_)
        summary = _run_import(
            import_recipe_sidecars, train_sets(cfg.data), output, encoder=encoder, dtype=dtype
        )
    elif each_a_set:
        sets = [CaptionSetConfig(path=str(s), caption_columns=dict(KINDS)) for s in shards or []]
        summary = _run_import(import_recipe_sidecars, sets, output, encoder=encoder, dtype=dtype)
    else:
        summary = _run_import(import_sidecars, shards, output, encoder=encoder, dtype=dtype)
    console.print(f"store: {summary['path']} ({summary['rows']} captions of {summary['images']} images)")


@app.command("llava-shards")
def llava_shards(
    data: Annotated[
        Path, typer.Argument(help="LLaVA records: a JSON list or JSONL file (e.g. llava_v1_5_mix665k.json).")
    ],
    output: OutputOpt = Path("data/llava-shards"),
    image_folder: Annotated[
        Path | None,
        typer.Option(help="Folder the records' image paths are relative to (default: the file's folder)."),
    ] = None,
    per_shard: Annotated[int, typer.Option(help="Samples per shard (checked below, in one line).")] = 1000,
    prefix: Annotated[
        str, typer.Option(help="Shard names: PREFIX-000000.tar, PREFIX-000001.tar, ...")
    ] = "llava",
    skip_bad: Annotated[
        bool, typer.Option(help="Leave bad records out (and count them) instead of stopping at the first.")
    ] = False,
    max_bad_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="With --skip-bad, stop above this share.")
    ] = 0.01,
) -> None:
    """Write LLaVA JSON records and their images as webdataset shards (for `llava.<phase>.data.stream`)."""
    from llm2clip_vlm.data.conversations import load_llava_records
    from llm2clip_vlm.data.errors import BadRecords
    from llm2clip_vlm.data.llava_shards import check_prefix, write_llava_shards
    from llm2clip_vlm.identity import file_stamp

    if per_shard <= 0:
        console.print(f"[red]llava-shards:[/red] --per-shard must be positive, got {per_shard}")
        raise typer.Exit(2)
    try:
        check_prefix(prefix)  # before reading anything: the shards stay inside --output
    except ValueError as e:
        console.print(f"[red]llava-shards:[/red] --prefix: {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from e
    if not data.is_file():
        console.print(
            f"[red]llava-shards:[/red] {escape(str(data))}: no such file (a LLaVA JSON or JSONL file)"
        )
        raise typer.Exit(2)
    bad = BadRecords(skip_bad, max_bad_fraction, name=str(data), option="--skip-bad")
    # Every image is decoded once first (cached by the data's identity): a broken one is named
    # before any shard is written, not halfway through.
    records = load_llava_records(
        data, image_folder or "", skip_bad=skip_bad, max_bad_fraction=max_bad_fraction, bad=bad
    )
    folder = (image_folder or data.parent).resolve()
    source = {"data": file_stamp(data), "image_folder": str(folder), "skip_bad": skip_bad}
    paths = write_llava_shards(
        records, output, per_shard=per_shard, prefix=prefix, source=source, show_progress=True
    )
    left_out = f"; {len(bad.skipped)} bad records left out, first: {bad.skipped[0][1]}" if bad.skipped else ""
    console.print(
        f"wrote {len(records)} records in {len(paths)} shards to {output}{left_out}", soft_wrap=True
    )
    console.print(
        f"train on them: --set llava.<phase>.data.path={output} --set llava.<phase>.data.stream=true"
    )


@app.command("inspect-data")
def inspect_data(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Data to check: shards (folder, glob, brace), a manifest, an img2dataset folder, LLaVA JSON."
        ),
    ],
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", "-r", help="Read the data as this recipe does (its columns, image root, tokenizer)."
        ),
    ] = None,
    set_: SetOpt = None,
    caption_column: Annotated[
        list[str] | None,
        typer.Option(
            "--caption-column", "-c", help="COLUMN=short|long (repeatable; default: recognised by name)."
        ),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the image paths are relative to (LLaVA: its image_folder).")
    ] = None,
    all_images: Annotated[bool, typer.Option("--all", help="Decode every image, not a sample.")] = False,
    sample: Annotated[int, typer.Option(help="Records sampled for image decoding and token lengths.")] = 1000,
) -> None:
    """Check data before a long run: format, records, images, captions and token lengths, duplicate
    keys, LLM2CLIP side-cars, and the recipe block that reads it. Ends with `ready` or what to fix."""
    import yaml

    from llm2clip_vlm import inspect_data as doctor
    from llm2clip_vlm.data.config import CaptionSetConfig

    if sample <= 0:
        console.print(f"[red]inspect-data:[/red] --sample must be positive, got {sample}")
        raise typer.Exit(2)
    if recipe is None:  # the defaults (not the demo recipe's small settings): stage1.max_length 512
        try:
            cfg = config_io.load(RunConfig, None, set_ or [])
        except ValueError as e:
            console.print(f"[red]config error:[/red] {e}")
            raise typer.Exit(2) from e
    else:
        cfg = resolve_config(recipe, set_)
    columns: dict[str, str] = {}
    for item in caption_column or []:
        name, _, kind = item.partition("=")
        if not name or kind not in ("short", "long"):
            console.print(
                f"[red]inspect-data:[/red] --caption-column {item!r}: write COLUMN=short or COLUMN=long"
            )
            raise typer.Exit(2)
        columns[name] = kind
    count_tokens, unit = _caption_tokenizer(cfg.stage1.model, cfg.stage1.max_length)
    reports = []
    for path in paths:
        where = str(path)
        if not path.exists() and not any(c in where for c in "*?{"):
            console.print(f"[red]inspect-data:[/red] {escape(where)}: no such file or folder", soft_wrap=True)
            raise typer.Exit(2)
        if doctor.is_llava(where):
            report = doctor.inspect_llava(where, str(image_root or ""), sample=sample, all_images=all_images)
        else:
            train = _recipe_set(cfg, where) if recipe is not None else None
            set_cfg = CaptionSetConfig(
                path=where,
                caption_columns=columns or (dict(train.caption_columns) if train is not None else {}),
                image_root=str(image_root or (train.image_root if train is not None else "")),
                image_column=train.image_column if train is not None else "image",
                key_column=train.key_column if train is not None else "",
            )
            report = doctor.inspect_caption_set(
                set_cfg, count_tokens=count_tokens, token_unit=unit, max_length=cfg.stage1.max_length,
                sample=sample, all_images=all_images, workers=cfg.data.check_workers,
            )  # fmt: skip
        reports.append(report)
        for line in doctor.render(report):
            console.print(escape(line), soft_wrap=True, highlight=False)
    console.print("recipe block that reads it as it is:")
    console.print(
        # One line per value (paths stay whole and copyable).
        escape(yaml.safe_dump(doctor.recipe_block(reports), sort_keys=False, width=1 << 20)).rstrip(),
        highlight=False,
        soft_wrap=True,
    )
    verdict = doctor.verdict(reports)
    style = "green" if verdict.startswith("ready") else "red"
    console.print(f"[{style}]{escape(verdict)}[/{style}]", soft_wrap=True, highlight=False)
    if not verdict.startswith("ready"):
        raise typer.Exit(1)


def _recipe_set(cfg: RunConfig, path: str) -> Any:
    """The recipe's caption set for ``path``: the one with that path when data.train lists several."""
    train = cfg.data.train
    sets = train if isinstance(train, list) else [train]
    return next((s for s in sets if getattr(s, "path", "") == path), sets[0] if sets else None)


def _caption_tokenizer(model: str, max_length: int) -> tuple[Any, str]:
    """``(texts -> token counts, unit)`` with the stage-1 model's tokenizer; words when it cannot load."""
    from llm2clip_vlm.text.modeling import load_tokenizer, resolve_model_ref

    try:
        # The GGUF file itself (a tokenizer reads its metadata only): no conversion of the weights.
        tokenizer = load_tokenizer(resolve_model_ref(model, convert_gguf=False))
    except (OSError, ValueError, ImportError) as e:
        console.print(
            f"inspect-data: tokenizer of {escape(model)} not loaded ({escape(str(e))}); counting words"
        )
        return (lambda texts: [len(t.split()) for t in texts]), "words"

    def count(texts: list[str]) -> list[int]:
        # No truncation: the point is to see how many exceed max_length.
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]

    return count, "tokens"


@app.command("build-tower")
def build_tower(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/build-tower"),
    set_: SetOpt = None,
    from_stage: Annotated[
        str | None, typer.Option(help="Rerun from this stage: stage1 | embed | stage2 | export.")
    ] = None,
    push_to_hub: PushOpt = None,
    without_stage1: Annotated[
        bool,
        typer.Option(
            "--without-stage1",
            help="The paper's ablation (a control tower for llava-compare): no stage-1 training; "
            "stage 2 aligns to caption embeddings of the base LLM as pretrained (causal, mean-pooled).",
        ),
    ] = False,
) -> None:
    """Stage 1, embed, stage 2 and export in one command (stages whose artifact matches are skipped)."""
    from llm2clip_vlm.pipeline import STAGES, print_metrics, run_build_tower

    if from_stage is not None and from_stage not in STAGES:
        console.print(f"[red]--from-stage must be one of {', '.join(STAGES)}[/red], got {from_stage!r}")
        raise typer.Exit(2)
    cfg = resolve_config(recipe, set_)
    with claimed_output(output, "build-tower", None) as claim:
        metrics = run_build_tower(
            cfg, output, from_stage=from_stage, claim=claim, without_stage1=without_stage1
        )
    print_metrics(metrics, output)
    if os.environ.get("RANK", "0") == "0":  # one process writes the report and uploads
        _report_and_logs(output, [output])
        _push(output / "tower", push_to_hub)


TowerOpt = Annotated[
    str | None, typer.Option("--tower", help="Exported tower directory (default: llava.tower of the config).")
]


def _run_llava(phase: str, recipe: Path | None, output: Path, set_: list[str] | None, tower: str | None,
               init: Path | None, push_to_hub: str | None = None,
               allow_config_change: bool = False, restart: bool = False) -> None:  # fmt: skip
    from llm2clip_vlm.commands import run_llava
    from llm2clip_vlm.data.conversations import ConversationError
    from llm2clip_vlm.data.errors import DataError
    from llm2clip_vlm.llava.model import MissingInputError

    cfg = resolve_config(recipe, set_)
    if tower:
        cfg.llava.tower = tower
    try:
        with claimed_output(output, f"llava-{phase}", cfg, allow_config_change, restart) as claim:
            metrics = run_llava(cfg, output, phase, init=init, claim=claim)  # type: ignore[arg-type]
    except (MissingInputError, FileNotFoundError) as e:
        console.print(f"[red]llava-{phase}:[/red] {escape(str(e))}", soft_wrap=True)  # paths stay copyable
        raise typer.Exit(2) from e
    except (DataError, ConversationError) as e:
        # escape: record names like "data.json[#3]" would read as rich markup.
        console.print(f"[red]llava-{phase}: bad data:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(1) from e
    if not metrics:  # non-main processes
        return
    train, details = metrics["train"], metrics["details"]
    line = (
        f"llava {phase}: {train['steps']} steps in {train['seconds']:.0f} s, loss "
        f"{train['loss_start_mean']:.3f} -> {train['loss_end_mean']:.3f} (mean of first/last steps)"
    )
    before, after = metrics["eval"].get("before") or {}, metrics["eval"].get("after") or {}
    if after:
        was = f"{before['accuracy']:.1f} -> " if before else ""
        line += f"; held-out accuracy {was}{after['accuracy']:.1f} %"
    console.print(line)
    if after:
        console.print(_heldout_table(after))
    if details["bad_records"]["count"] or details["dropped_samples"]:
        console.print(
            f"[yellow]skipped {details['bad_records']['count']} bad records, dropped "
            f"{details['dropped_samples']} samples[/yellow] (listed in {output / 'metrics.json'})"
        )
    if details["truncated_samples"]:
        console.print(f"{details['truncated_samples']} samples were truncated to max_length")
    console.print(f"model: {output / 'model'}   projector: {output / 'mm_projector.safetensors'}")
    _report_and_logs(output, [output])
    _push(output / "model", push_to_hub)


def _heldout_table(after: dict[str, Any]) -> Any:
    """Held-out accuracy per question type after training, next to the blind and majority baselines."""
    from rich.table import Table

    blind = after.get("blind")
    title = "held-out accuracy (%) after training"
    if blind:
        shown = "another question's image" if blind == "shuffle" else "a blank image"
        title += f"; blind = the same questions with {shown}"
    table = Table(title=title)
    for col in ("type", "n", "accuracy", "blind", "gap", "majority answer"):
        table.add_column(col, justify="left" if col == "type" else "right")

    def cells(name: str, r: dict[str, Any], majority: str = "") -> list[str]:
        b = r.get("blind_accuracy")
        return [
            name, str(r["n"]), f"{r['accuracy']:.1f}", "-" if b is None else f"{b:.1f}",
            "-" if b is None else f"{r['gap']:+.1f}",
            f"{r.get('majority_accuracy', float('nan')):.1f}" + (f" ({escape(majority)})" if majority else ""),
        ]  # fmt: skip

    for t, r in after.get("per_type", {}).items():
        table.add_row(*cells(t, r, r.get("majority_answer", "")))
    table.add_row(*cells("all", after))
    return table


@app.command("llava-pretrain")
def llava_pretrain(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/llava-pretrain"),
    set_: SetOpt = None,
    tower: TowerOpt = None,
    push_to_hub: PushOpt = None,
    allow_config_change: AllowChangeOpt = False,
    restart: RestartOpt = False,
) -> None:
    """LLaVA-1.5 projector pretraining on top of a tower (only the projector trains)."""
    _run_llava("pretrain", recipe, output, set_, tower, None, push_to_hub, allow_config_change, restart)


@app.command("llava-finetune")
def llava_finetune(
    recipe: RecipeArg = None,
    output: OutputOpt = Path("runs/llava-finetune"),
    set_: SetOpt = None,
    tower: TowerOpt = None,
    init: Annotated[
        Path,
        typer.Option(
            "--from",
            help=(
                "The pretrained projector: a llava-pretrain output (whose LLM, when its pretraining "
                "trained it, the finetune continues) or a mm_projector.safetensors file."
            ),
        ),
    ] = Path("runs/llava-pretrain"),
    push_to_hub: PushOpt = None,
    allow_config_change: AllowChangeOpt = False,
    restart: RestartOpt = False,
) -> None:
    """LLaVA-1.5 instruction tuning (projector + LLM: full, LoRA or QLoRA)."""
    _run_llava("finetune", recipe, output, set_, tower, init, push_to_hub, allow_config_change, restart)


@app.command("llava-compare")
def llava_compare(
    recipe: RecipeArg = None,
    towers: Annotated[
        list[str] | None,
        typer.Option(
            "--tower",
            help="NAME=DIR: a tower to train the recipe's LLaVA on (repeatable, two or more), e.g. "
            "llm2clip=runs/demo/tower control=runs/control/tower.",
        ),
    ] = None,
    output: OutputOpt = Path("runs/llava-compare"),
    set_: SetOpt = None,
    restart: Annotated[
        bool,
        typer.Option("--restart", help="Discard every tower's earlier runs in --output and train again."),
    ] = False,
) -> None:
    """The same LLaVA (pretrain + finetune) on several towers; held-out tables side by side, with blind baselines.

    Trains into OUTPUT/NAME/pretrain and OUTPUT/NAME/finetune per tower (finished ones are skipped on a rerun), then writes OUTPUT/comparison.md, comparison.json and report.html; progress also goes to OUTPUT/compare.log.
    """
    from llm2clip_vlm.llava_compare import TowerSpecError, parse_towers, run_compare
    from llm2clip_vlm.reports.compare import table_rows

    try:
        tower_list = parse_towers(towers or [])
    except TowerSpecError as e:
        console.print(f"[red]llava-compare:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from e
    cfg = resolve_config(recipe, set_)
    doc = run_compare(cfg, tower_list, output, restart=restart)
    from rich.table import Table

    # One column per tower (acc / blind / gap) keeps the table readable in an 80-column log;
    # comparison.md has them as separate columns.
    head, rows = table_rows(doc)
    names = [tw["name"] for tw in doc["towers"]]
    table = Table(title="held-out accuracy (%): acc / blind (image withheld) / gap, per tower")
    for i, col in enumerate([*head[:3], *names]):
        table.add_column(escape(col), justify="left" if i == 0 else "right")
    for row in rows:
        cells = [" / ".join(row[3 + 3 * t : 6 + 3 * t]) for t in range(len(names))]
        table.add_row(*(escape(c) for c in [*row[:3], *cells]))
    console.print(table)
    for note in doc["notes"]:
        console.print(f"[yellow]{escape(note)}[/yellow]", soft_wrap=True)
    console.print(
        f"comparison: {output / 'comparison.md'}  {output / 'comparison.json'}  {output / 'report.html'}",
        soft_wrap=True,
    )


@app.command("eval")
def evaluate(
    models: Annotated[
        list[Path] | None, typer.Argument(help="LLaVA model directories (transformers format).")
    ] = None,
    tasks: Annotated[
        str, typer.Option(help="Comma-separated tasks: mme, scienceqa_img, vizwiz_vqa_val.")
    ] = "mme,scienceqa_img,vizwiz_vqa_val",
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir",
            help="Local parquet copies of the tasks (docs/DATA.md), or 'demo' for synthetic ones. "
            "Default: the standard tasks with their hub data.",
        ),
    ] = None,
    dataset_org: Annotated[
        str,
        typer.Option(
            "--dataset-org",
            help="Hub organisation of the data sets: lmms-lab or lmms-lab-encoder (lmms-eval moved "
            "them after v0.7.2), for every task or per task (mme=lmms-lab,...). Default: as the "
            "installed lmms-eval.",
        ),
    ] = "",
    output: OutputOpt = Path("runs/eval"),
    limit: Annotated[
        int | None, typer.Option(min=1, help="Evaluate only the first N documents of each task.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per generate call.")] = 1,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if present).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16.")] = "auto",
    model_args: Annotated[
        str, typer.Option(help="Extra model_args for llm2clip_llava (key=value,...).")
    ] = "",
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="lmms-eval results JSON of earlier runs to compare (repeatable)."),
    ] = None,
    blind: Annotated[
        str,
        typer.Option(
            help="Also run each model blind, as a row 'LABEL-blind': shuffle = every question gets "
            "another question's image; blank = a mean-colour image; off = no blind row."
        ),
    ] = "off",
) -> None:
    """Evaluate LLaVA models with lmms-eval (MME, ScienceQA-IMG, VizWiz) and compare them with the paper."""
    from llm2clip_vlm.evaluation.report import rich_table
    from llm2clip_vlm.evaluation.run import EvalOptions, EvalSetupError, run_eval

    if not models and not compare:
        console.print("[red]eval:[/red] give at least one MODEL directory or a --compare results file")
        raise typer.Exit(2)
    if blind not in ("shuffle", "blank", "off"):
        console.print(f"[red]eval:[/red] --blind must be shuffle, blank or off, got {escape(blind)!r}")
        raise typer.Exit(2)
    from llm2clip_vlm.evaluation.local_tasks import parse_dataset_orgs

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        orgs = parse_dataset_orgs(dataset_org, task_list)
    except ValueError as e:
        console.print(f"[red]eval:[/red] {e}")
        raise typer.Exit(2) from e
    options = EvalOptions(
        tasks=task_list,
        dataset_orgs=orgs,
        blind=blind,
        data_dir=data_dir,
        limit=limit,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        model_args=model_args,
    )
    try:
        report = run_eval(list(models or []), options, output, compare=list(compare or []))
    except EvalSetupError as e:
        console.print(f"[red]eval:[/red] {e}")
        raise typer.Exit(2) from e
    if not report:  # non-main processes
        return
    Console().print(rich_table(report["rows"], report["title"]))
    for label, path in report["files"].items():
        console.print(f"{label}: {path}")
    console.print(f"table: {output / 'comparison.md'}  summary: {output / 'summary.json'}")


@app.command("eval-data")
def eval_data(
    out: Annotated[
        Path, typer.Argument(help="Folder for mme.parquet, scienceqa_img.parquet, vizwiz_vqa_val.parquet.")
    ],
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    mme_images: Annotated[int, typer.Option(min=1, help="MME images per category (two questions each).")] = 4,
    scienceqa: Annotated[int, typer.Option(min=1, help="ScienceQA-IMG questions.")] = 24,
    vizwiz: Annotated[int, typer.Option(min=1, help="VizWiz questions.")] = 24,
    tiny_model: Annotated[
        Path | None, typer.Option(help="Also write a tiny random LLaVA model here (to try `eval`).")
    ] = None,
) -> None:
    """Write small synthetic local copies of MME, ScienceQA-IMG and VizWiz (the hub data sets' columns)."""
    from llm2clip_vlm.evaluation.synthetic_tasks import write_eval_data

    counts = write_eval_data(
        out, seed=seed, mme_images_per_category=mme_images, scienceqa=scienceqa, vizwiz=vizwiz
    )
    console.print(f"eval data in {out}: " + ", ".join(f"{t} {n} rows" for t, n in counts.items()))
    if tiny_model is not None:
        from llm2clip_vlm.evaluation.tiny import save_tiny_llava

        save_tiny_llava(tiny_model, seed=seed)
        console.print(f"tiny random LLaVA model in {tiny_model}")


@app.command("report")
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories (stage1, stage2, llava-*, or a build-tower DIR).")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The HTML file to write (a folder gets report.html).")
    ] = Path("report.html"),
    title: Annotated[str, typer.Option(help="Page title.")] = "llm2clip-vlm run report",
) -> None:
    """One self-contained HTML page: loss/lr curves of all runs, CRA, retrieval, LLaVA answers."""
    from llm2clip_vlm.reports import NotARunError, load_runs, write_report

    try:
        found = load_runs(runs)
    except NotARunError as e:
        console.print(f"[red]report:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from e
    path = write_report(found, output, title)
    console.print(f"report: {path} ({len(found)} runs)")


@app.command("plan")
def plan(
    recipe: RecipeArg = None,
    gpus: Annotated[int, typer.Option(help="GPUs (processes) the stages run on.")] = 8,
    gpu_memory: Annotated[float, typer.Option("--gpu-memory", help="Memory of one GPU, GiB.")] = 80.0,
    mfu: Annotated[float, typer.Option(help="Share of the bf16 peak the steps reach (model FLOPs).")] = 0.4,
    gpu: Annotated[
        str, typer.Option(help="GPU name for its dense bf16 peak (H100, A100, H200, ...).")
    ] = "H100",
    accelerate: Annotated[
        Path | None,
        typer.Option(help="accelerate config (default: the one the recipe's run line names, else DDP)."),
    ] = None,
    tower: Annotated[
        str | None,
        typer.Option(
            help="LLaVA: the tower's config (a directory or a reference name such as "
            "clip-vit-large-patch14-336) when llava.tower does not exist yet."
        ),
    ] = None,
    images: Annotated[
        int | None, typer.Option(help="Records per epoch (default: CC3M+CC12M, LCS-558K or mix665k).")
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(help="Plan only these: stage1, embed, stage2, llava-pretrain, llava-finetune."),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the plan as JSON here.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Memory per GPU and time per epoch of a recipe's stages, from its models built on the meta
    device (nothing is downloaded or allocated). Ends with "fits" or the knob to turn."""
    from llm2clip_vlm.commands import PLAN_STAGES, run_plan
    from llm2clip_vlm.plan.flops import bf16_peak_flops
    from llm2clip_vlm.plan.known import UnknownModelError
    from llm2clip_vlm.plan.report import document, table, verdict, write_json
    from llm2clip_vlm.plan.stages import Cluster

    if recipe is not None and not recipe.is_file():
        console.print(f"[red]plan:[/red] recipe {escape(str(recipe))} does not exist", soft_wrap=True)
        raise typer.Exit(2)
    peak = bf16_peak_flops(gpu)
    bad = [s for s in stage or [] if s not in PLAN_STAGES]
    if peak is None or bad or gpus < 1 or gpu_memory <= 0 or not 0 < mfu <= 1:
        why = f"unknown --gpu {gpu!r}" if peak is None else f"unknown --stage {bad}" if bad else (
            "--gpus >= 1, --gpu-memory > 0 and 0 < --mfu <= 1")  # fmt: skip
        console.print(f"[red]plan:[/red] {escape(why)}", soft_wrap=True)
        raise typer.Exit(2)
    cfg = resolve_config(recipe, set_)
    cluster = Cluster(gpus, gpu_memory, peak, mfu)
    try:
        plans, dist = run_plan(
            cfg, recipe, cluster, accelerate=accelerate, tower=tower, records=images, stages=stage
        )
    except (UnknownModelError, ValueError, FileNotFoundError, ImportError) as e:
        console.print(f"[red]plan:[/red] {escape(str(e))}", soft_wrap=True)
        raise typer.Exit(2) from e
    name = str(recipe) if recipe else "demo recipe"
    out = Console()
    out.print(table(name, plans, cluster))
    out.print(f"distributed: {dist.strategy} ({escape(dist.source)})", soft_wrap=True)
    for p in plans:
        for note in p.notes:
            out.print(f"{p.stage}: {escape(note)}", soft_wrap=True)
    out.print(f"verdict: {verdict(plans)}", soft_wrap=True, highlight=False)
    if json_path is not None:
        write_json(json_path, document(name, plans, cluster))
        console.print(f"plan written to {json_path}", soft_wrap=True, highlight=False)


@app.command("bench")
def bench(
    suite: Annotated[str, typer.Argument(help="stage1 | embed | stage2 | tower | llava")],
    preset: Annotated[
        str | None,
        typer.Option(
            help="The suite's preset; the first is the default. stage1: tiny, llama3-8b; "
            "embed: tiny, dry, llama3-8b; stage2: tiny, tiny-577, dry, vit-l-336-llama3-8b; "
            "tower: tiny, tiny-siglip, micro, vit-l-14-336; llava: tiny, vicuna-7b.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: the preset's).")
    ] = None,
    warmup: Annotated[
        int | None, typer.Option(min=0, help="Warm-up calls per variant (default: the preset's).")
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(min=1, help="Timed calls per variant (default: the preset's).")
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
    # Before any tensor exists: freed activation memory stays in the process instead of being
    # unmapped and faulted in again every step (glibc only; llm2clip_vlm.allocator).
    keep_freed_memory()
    # Our own rich bars show progress; transformers' per-file tqdm bars would only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Other libraries' tqdm bars (transformers' GGUF de-quantisation: 272 carriage-return updates
    # in a log file) too; tqdm reads TQDM_* once, when it is first imported, which is after this.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    exit_on_sigterm()  # a scheduler's preemption is one line and 143, never a raw -15
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        console.print("[red]interrupted[/red]")
        sys.exit(130)
    except Terminated as e:
        console.print(f"[yellow]{escape(str(e))}[/yellow]", soft_wrap=True, highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:
        sys.exit(_report_error(e))


def _report_error(e: Exception) -> int:
    """One line (and an exit status) for an error the user can fix; a traceback for a bug."""
    import traceback

    from llm2clip_vlm.errors import BUG_EXIT_CODE, bug_report, describe

    known = describe(e)
    if known is None:
        traceback.print_exception(e)
        console.print(f"[red]{escape(bug_report(e))}[/red]", soft_wrap=True, highlight=False)
        return BUG_EXIT_CODE
    label = f"[{known.style}]{known.label}:[/{known.style}] " if known.label else ""
    text = escape(known.message) if known.label else f"[{known.style}]{escape(known.message)}[/{known.style}]"
    console.print(label + text, soft_wrap=True, highlight=False)  # one line: paths stay copyable
    return known.exit_code


if __name__ == "__main__":  # pragma: no cover
    main()
