"""lmms-eval task YAMLs that read local parquet copies of MME, ScienceQA-IMG and VizWiz-VQA (val).

Each local task is lmms-eval's own task definition, loaded from the installed lmms-eval, with only
the data source and the name changed: ``dataset_path: parquet`` + ``dataset_kwargs.data_files``
pointing at the local files, and a unique name (``<task>_local``; built-in names win in lmms-eval's
task index). Prompts (``doc_to_text``), generation kwargs, ``process_results`` and the metrics are
the built-in ones, referenced as ``!function lmms_eval.tasks.<dir>.utils.<fn>``, so a local run
scores exactly like a hub run of the same lmms-eval version.

A data directory holds, per task, ``<task>.parquet`` or a folder ``<task>/`` of parquet shards
(e.g. the hub's files), with the hub data set's columns (docs/DATA.md).

The hub copies can also be taken from another organisation than the installed lmms-eval names:
lmms-eval moved its image data sets from ``lmms-lab/*`` to ``lmms-lab-encoder/*`` after v0.7.2
(EvolvingLMMs-Lab/lmms-eval PR #1416; the old names still redirect). :func:`write_hub_tasks`
writes the built-in task under its own name with only ``dataset_path``'s organisation changed,
per task, so either release of lmms-eval can read either location.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class TaskSource:
    """Where a standard task is defined in lmms-eval and which split its docs are in."""

    name: str
    task_dir: str  # folder under lmms_eval/tasks
    yaml_file: str
    split: str

    @property
    def local_name(self) -> str:
        return f"{self.name}_local"


TASKS: dict[str, TaskSource] = {
    t.name: t
    for t in (
        TaskSource("mme", "mme", "mme.yaml", "test"),
        TaskSource("scienceqa_img", "scienceqa", "scienceqa_img.yaml", "test"),
        TaskSource("vizwiz_vqa_val", "vizwiz_vqa", "vizwiz_vqa_val.yaml", "val"),
    )
}


class FunctionRef(str):
    """A ``!function`` reference kept as text while a task YAML is read and rewritten."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def _lmms_tasks_dir() -> Path:
    return Path(str(resources.files("lmms_eval") / "tasks"))


def _absolute_refs(value: Any, module: str) -> Any:
    """``!function utils.f`` (relative to the task folder) -> ``!function lmms_eval.tasks.<dir>.utils.f``."""
    if isinstance(value, FunctionRef):
        return value if value.startswith("lmms_eval.") else FunctionRef(f"{module}.{value}")
    if isinstance(value, dict):
        return {k: _absolute_refs(v, module) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute_refs(v, module) for v in value]
    return value


def builtin_task_config(source: TaskSource) -> dict[str, Any]:
    """lmms-eval's own config of a task, with ``include`` files merged and functions made absolute.

    Raises:
        FileNotFoundError: the installed lmms-eval has no such task file.
    """
    folder = _lmms_tasks_dir() / source.task_dir
    path = folder / source.yaml_file
    if not path.is_file():
        raise FileNotFoundError(f"lmms-eval has no task file {path} (lmms-eval version changed?)")
    config = yaml.load(path.read_text(), Loader=_Loader)
    include = config.pop("include", None)
    if include:
        base = yaml.load((folder / include).read_text(), Loader=_Loader)
        config = {**base, **config}
    return _absolute_refs(config, f"lmms_eval.tasks.{source.task_dir}")


DATASET_ORGS = ("lmms-lab", "lmms-lab-encoder")


def parse_dataset_orgs(spec: str, tasks: list[str]) -> dict[str, str]:
    """``"lmms-lab"`` (every task) or ``"mme=lmms-lab,vizwiz_vqa_val=lmms-lab-encoder"`` -> ``{task: org}``.

    Raises:
        ValueError: an unknown organisation or task, or a malformed entry (named).
    """
    spec = spec.strip()
    if not spec:
        return {}
    orgs: dict[str, str] = {}
    for entry in (e.strip() for e in spec.split(",")):
        task, _, org = entry.rpartition("=")
        for t in [task] if task else tasks:
            if t not in TASKS:
                raise ValueError(f"dataset org {entry!r}: unknown task {t!r}; known: {', '.join(TASKS)}")
            if org not in DATASET_ORGS:
                raise ValueError(
                    f"dataset org {entry!r}: {org!r} is not one of {', '.join(DATASET_ORGS)} "
                    "(lmms-eval's data sets before / after its PR #1416)"
                )
            orgs[t] = org
    return orgs


def write_hub_tasks(out_dir: str | Path, tasks: list[str], orgs: dict[str, str]) -> dict[str, str]:
    """Write the built-in tasks, each reading its hub data set from ``orgs[task]``, into ``out_dir``.

    The task keeps lmms-eval's own name, prompts, metrics and split; only ``dataset_path``'s
    organisation changes (``lmms-lab-encoder/MME`` -> ``lmms-lab/MME``). Use the folder as
    lmms-eval's only include path (``include_defaults=False``) so the built-ins do not shadow it.

    Returns:
        ``{standard name: task name}`` (the same names).

    Raises:
        ValueError: a task without a definition here.
    """
    out_dir = Path(out_dir)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"no task definition for {unknown}; known: {', '.join(TASKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        source = TASKS[task]
        config = builtin_task_config(source)
        for key in ("group", "tag"):
            config.pop(key, None)
        repo = str(config.get("dataset_path", ""))
        if "/" not in repo:
            raise ValueError(
                f"lmms-eval's {source.yaml_file} has dataset_path {repo!r}, not an org/name repo"
            )
        org = orgs.get(task, repo.split("/", 1)[0])
        config["dataset_path"] = f"{org}/{repo.split('/', 1)[1]}"
        text = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        (out_dir / f"{task}.yaml").write_text(
            f"# Generated by llm2clip-vlm from lmms-eval's {source.task_dir}/{source.yaml_file} "
            f"(data set from {org})\n{text}"
        )
    return {t: t for t in tasks}


def data_files(data_dir: Path, task: str) -> str:
    """The parquet file (or shard glob) of ``task`` in ``data_dir``.

    Raises:
        FileNotFoundError: neither ``<task>.parquet`` nor ``<task>/*.parquet`` exists.
    """
    single = data_dir / f"{task}.parquet"
    if single.is_file():
        return str(single.resolve())
    folder = data_dir / task
    if folder.is_dir() and any(folder.glob("*.parquet")):
        return str(folder.resolve() / "*.parquet")
    raise FileNotFoundError(
        f"{data_dir}: no data for task {task!r} (expected {single.name} or {task}/*.parquet); "
        "`llm2clip-vlm eval-data DIR` writes small synthetic copies"
    )


def write_local_tasks(data_dir: str | Path, out_dir: str | Path, tasks: list[str]) -> dict[str, str]:
    """Write ``<task>_local.yaml`` files into ``out_dir`` for lmms-eval's ``include_path``.

    Args:
        data_dir: the folder with the tasks' parquet files.
        out_dir: where the YAMLs go (an lmms-eval include path).
        tasks: standard task names (``mme``, ``scienceqa_img``, ``vizwiz_vqa_val``).

    Returns:
        ``{standard name: local task name}``.

    Raises:
        ValueError: a task without a local copy definition.
        FileNotFoundError: a task's data is missing.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"no local copy for task(s) {unknown}; local copies exist for {', '.join(TASKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for task in tasks:
        source = TASKS[task]
        config = builtin_task_config(source)
        for key in ("dataset_name", "group", "tag"):
            config.pop(key, None)
        config["task"] = source.local_name
        config["dataset_path"] = "parquet"
        config["dataset_kwargs"] = {"data_files": {source.split: data_files(data_dir, task)}}
        config["test_split"] = source.split
        text = yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        (out_dir / f"{source.local_name}.yaml").write_text(
            f"# Generated by llm2clip-vlm from lmms-eval's {source.task_dir}/{source.yaml_file}\n{text}"
        )
        names[task] = source.local_name
    return names


__all__ = [
    "DATASET_ORGS",
    "TASKS",
    "TaskSource",
    "builtin_task_config",
    "data_files",
    "parse_dataset_orgs",
    "write_hub_tasks",
    "write_local_tasks",
]
