"""``llm2clip-vlm eval``: run the real lmms-eval on one or more LLaVA models and compare them.

With a data directory, the tasks are local copies (``local_tasks.py``) and only they are indexed;
without one, the standard lmms-eval tasks read their hub data sets (checked reachable first, so an
offline machine gets a clear message instead of a stack of retries); ``dataset_orgs`` reads them from
``lmms-lab`` or ``lmms-lab-encoder`` per task (``local_tasks.write_hub_tasks``). Per model, lmms-eval's own
results JSON and per-sample logs are written by its ``EvaluationTracker``; ``summary.json`` and
``comparison.md`` hold the table across models with the reference numbers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llm2clip_vlm.evaluation.local_tasks import write_hub_tasks, write_local_tasks
from llm2clip_vlm.evaluation.report import extract_metrics, load_results_file, markdown_table
from llm2clip_vlm.evaluation.synthetic_tasks import write_eval_data
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

STANDARD_TASKS = ("mme", "scienceqa_img", "vizwiz_vqa_val")
DEMO = "demo"


class EvalSetupError(RuntimeError):
    """The evaluation cannot start (missing lmms-eval, data, model or hub); the message says why."""


@dataclass
class EvalOptions:
    """What ``llm2clip-vlm eval`` runs."""

    tasks: list[str] = field(default_factory=lambda: list(STANDARD_TASKS))
    data_dir: str | None = None  # a folder of parquet copies, "demo", or None for the hub
    limit: int | None = None
    batch_size: int = 1
    device: str | None = None
    dtype: str = "auto"
    model_args: str = ""  # extra key=value,... for the lmms-eval model
    seed: int = 0
    # {task: "lmms-lab" | "lmms-lab-encoder"}: where the hub data sets are read (empty: as lmms-eval)
    dataset_orgs: dict[str, str] = field(default_factory=dict)
    # Also evaluate each model blind (llm2clip_llava's blind=shuffle|blank), as "LABEL-blind".
    blind: str = "off"


def require_lmms_eval() -> None:
    """Raise a clear error when lmms-eval is not installed."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as e:
        raise EvalSetupError(
            "lmms-eval is not installed: `LLM2CLIP_EVAL=1 bash scripts/install.sh` (or "
            "`bash scripts/install-eval.sh`) installs it without replacing torch (README, Evaluation)"
        ) from e


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("0", "", "false", "False"):
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except Exception:
        return False
    return True


def model_labels(models: list[Path]) -> list[str]:
    """Unique, file-name-safe labels for the models (their folder names)."""
    labels: list[str] = []
    for m in models:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", m.resolve().name) or "model"
        label, k = base, 2
        while label in labels:
            label, k = f"{base}-{k}", k + 1
        labels.append(label)
    return labels


def resolve_tasks(options: EvalOptions, output: Path) -> tuple[list[str], Any, str]:
    """(lmms-eval task names, TaskManager, description of the data source).

    Raises:
        EvalSetupError: unknown tasks, missing local data, or no hub without a data directory.
    """
    from lmms_eval.tasks import TaskManager

    if options.data_dir is None:
        if not hub_reachable():
            raise EvalSetupError(
                "the Hugging Face hub is not reachable, so lmms-eval cannot download the standard data "
                "sets; pass --data-dir DIR (parquet copies, docs/DATA.md) or --data-dir demo"
            )
        if not options.dataset_orgs:
            return list(options.tasks), TaskManager("WARNING"), "standard lmms-eval tasks (hub data)"
        try:
            names = write_hub_tasks(output / "tasks", list(options.tasks), options.dataset_orgs)
        except (ValueError, FileNotFoundError) as e:
            raise EvalSetupError(str(e)) from e
        manager = TaskManager("WARNING", include_path=str(output / "tasks"), include_defaults=False)
        where = ", ".join(f"{t}: {o}" for t, o in sorted(options.dataset_orgs.items()))
        return [names[t] for t in options.tasks], manager, f"standard lmms-eval tasks (hub data; {where})"
    if options.dataset_orgs:
        raise EvalSetupError("--dataset-org chooses hub data sets; it cannot be combined with --data-dir")
    data_dir = Path(options.data_dir)
    # Under `accelerate launch` every process writes its own copies (same content): no process
    # reads a file another one is still writing.
    rank = int(os.environ.get("RANK", "0"))
    suffix = f".rank{rank}" if rank else ""
    if options.data_dir == DEMO:
        data_dir = output / f"eval-data{suffix}"
        counts = write_eval_data(data_dir, seed=options.seed)
        log.info("demo data (synthetic world) in %s: %s", data_dir, counts)
    try:
        names = write_local_tasks(data_dir, output / f"tasks{suffix}", list(options.tasks))
    except (ValueError, FileNotFoundError) as e:
        raise EvalSetupError(str(e)) from e
    manager = TaskManager("WARNING", include_path=str(output / f"tasks{suffix}"), include_defaults=False)
    return [names[t] for t in options.tasks], manager, f"local copies in {data_dir}"


def _even_limit(limit: int | None, tasks: list[str]) -> int | None:
    # MME scores image pairs (acc+); an odd limit would cut the last pair and lmms-eval would fail.
    if limit is not None and limit % 2 and any(t.startswith("mme") for t in tasks):
        log.info("--limit %d rounded up to %d to keep MME's question pairs whole", limit, limit + 1)
        return limit + 1
    return limit


def evaluate_model(model_dir: Path, label: str, tasks: list[str], manager: Any, options: EvalOptions,
                   output: Path) -> dict[str, Any] | None:  # fmt: skip
    """One model through lmms-eval's ``simple_evaluate``; lmms-eval's files under ``output/label``.

    Returns:
        The results dict (``None`` on non-main processes of a multi-process run).
    """
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    args = [f"pretrained={model_dir.resolve()}", f"dtype={options.dtype}"]
    if options.device:
        args.append(f"device={options.device}")
    if options.model_args:
        args.append(options.model_args)
    tracker = EvaluationTracker(output_path=str(output / label))
    when = get_datetime_str()
    results = simple_evaluate(
        model="llm2clip_llava",
        model_args=",".join(args),
        tasks=tasks,
        batch_size=options.batch_size,
        limit=_even_limit(options.limit, tasks),
        task_manager=manager,
        log_samples=True,
        evaluation_tracker=tracker,
        verbosity="WARNING",
        datetime_str=when,
        random_seed=options.seed,
    )
    if results is None:
        return None
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples, datetime_str=when)
    for task in results.get("configs", {}):
        if samples and task in samples:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


def run_eval(
    models: list[Path], options: EvalOptions, output: Path, compare: list[Path] | None = None
) -> dict[str, Any]:
    """Evaluate every model, then write ``summary.json`` and ``comparison.md`` into ``output``.

    Args:
        models: LLaVA model directories.
        options: tasks, data source, limit, batch size, device, dtype.
        output: output folder.
        compare: earlier lmms-eval results JSON files to put in the table too.

    Returns:
        ``{"rows": {label: metrics}, "source": str, "files": {label: results path}}`` (empty on
        non-main processes).

    Raises:
        EvalSetupError: lmms-eval missing, a model directory missing, data missing.
    """
    for m in models:
        if not (m / "config.json").is_file():
            raise EvalSetupError(f"{m}: not a model directory (no config.json)")
    rows: dict[str, dict[str, float]] = {}
    files: dict[str, str] = {}
    for path in compare or []:
        try:
            label, metrics = load_results_file(path)
        except (OSError, ValueError) as e:
            raise EvalSetupError(f"--compare {path}: {e}") from e
        label = label if label not in rows else f"{label} ({path.name})"
        rows[label] = metrics
        files[label] = str(path)
    source = "results files"
    main_process = True
    if models:
        if options.data_dir is not None:
            # Local copies need no hub: never wait on it (read when datasets/hub are first imported).
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        require_lmms_eval()
        output.mkdir(parents=True, exist_ok=True)
        import datasets

        datasets.disable_progress_bars()
        tasks, manager, source = resolve_tasks(options, output)
        runs = [(m, label, options) for m, label in zip(models, model_labels(models), strict=True)]
        if options.blind != "off":  # the same questions with the image withheld, row by row
            blind_args = ",".join(a for a in (options.model_args, f"blind={options.blind}") if a)
            blind_options = replace(options, model_args=blind_args)
            runs = [r for m, label, o in runs for r in ((m, label, o), (m, f"{label}-blind", blind_options))]
        for model_dir, label, run_options in runs:
            log.info("evaluating %s on %s (%s)", label, ", ".join(tasks), source)
            results = evaluate_model(model_dir, label, tasks, manager, run_options, output)
            if results is None:
                # A non-main process of a multi-process run: it takes part in every model's run
                # (lmms-eval gathers across processes), rank 0 reports.
                main_process = False
                continue
            rows[label] = extract_metrics(results)
            found = sorted((output / label).rglob("*_results.json"))
            files[label] = str(found[-1]) if found else ""
    if not main_process:
        return {}
    output.mkdir(parents=True, exist_ok=True)
    title = f"lmms-eval: {source}" + (f" (limit {options.limit})" if options.limit and models else "")
    (output / "comparison.md").write_text(markdown_table(rows, title))
    summary = {"source": source, "limit": options.limit, "rows": rows, "files": files}
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {"rows": rows, "source": source, "files": files, "title": title}


__all__ = ["DEMO", "STANDARD_TASKS", "EvalOptions", "EvalSetupError", "hub_reachable", "run_eval"]
