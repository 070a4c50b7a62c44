"""Output directories have an owner: the command that wrote them, and the config they resume with.

Before a command writes anything, :func:`check` (through :func:`claimed`) checks its ``--output``:

- it must be a directory (or not exist yet), not a file;
- it must not belong to another command: ``run.json`` names the owner; directories written
  before ``run.json`` existed are recognised by what they hold (:func:`infer_owner`), so
  ``stage2 -o <a stage-1 run>`` is refused instead of loading stage 1's LoRA checkpoint;
- when it holds finished or resumable work (a checkpoint, a model, a store), the config must be
  the one that work was made with (``config.yaml``) in every key the command reads, except the
  settings that change speed only (:data:`SPEED_KEYS`: threads, workers, checkpoint frequency,
  time budget, evaluation batch). A changed ``lr`` or ``batch_size`` would otherwise silently
  mix two schedules; the refusal names the keys, and ``--allow-config-change`` overrides it.

Nothing is written by the checks. ``config.yaml`` is written by the run itself once its inputs
are validated, and ``run.json`` (the owner) after that, so a refused command leaves the directory
as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from llm2clip_vlm import config_io
from llm2clip_vlm.errors import RunDirError

OWNER_FILE = "run.json"
CONFIG_FILE = "config.yaml"

# Config sections each command's results depend on (a resume compares these).
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "stage1": ("data", "stage1"),
    "embed": ("data", "embed"),
    "stage2": ("data", "embed", "stage2"),
    "llava-pretrain": ("data", "llava"),
    "llava-finetune": ("data", "llava"),
    "build-tower": (),  # its stages compare fingerprints themselves (pipeline.py)
    "export-tower": (),
}

# Keys (last component) that change how fast a run goes, never what it computes.
SPEED_KEYS = frozenset(
    {"num_workers", "save_every_steps", "keep_checkpoints", "max_seconds", "eval_batch_size", "threads"}
)
# Whole sections that are speed/process settings.
SPEED_SECTIONS = ("runtime",)


def infer_owner(out: Path) -> str | None:
    """The command that wrote ``out``: ``run.json``, else recognised by its contents; None if new."""
    owner_file = out / OWNER_FILE
    if owner_file.is_file():
        try:
            return str(json.loads(owner_file.read_text())["command"])
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
    if (out / "stage1").is_dir() and (out / "store").is_dir():
        return "build-tower"
    if (out / "encoder" / "llm2clip_encoder.json").is_file() or (out / "checkpoints" / "mntp").is_dir():
        return "stage1"
    if (out / "model" / "llm2clip_config.json").is_file():
        return "stage2"
    if (out / "train" / "plan.json").is_file() or (out / "train" / "manifest.json").is_file():
        return "embed"
    if (out / "mm_projector.safetensors").is_file():
        return "llava"
    return None


def has_work(out: Path) -> bool:
    """Whether ``out`` holds results a rerun would resume from or keep."""
    return (
        any(out.glob("checkpoints/**/checkpoint.json"))
        or (out / "model").is_dir()
        or (out / "encoder").is_dir()
        or any(out.glob("*/plan.json"))
    )


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (an empty dict and lists stay values)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` for every non-speed key of ``sections`` that differs.

    A key missing from the old config (written by an older version) is not compared.
    """
    a = flatten({s: old.get(s, {}) for s in sections if s in old})
    b = flatten({s: new.get(s, {}) for s in sections})
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in SPEED_SECTIONS or key.rsplit(".", 1)[-1] in SPEED_KEYS:
            continue
        if key not in a:
            continue
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes


def check(out: str | Path, command: str, cfg: Any = None, *, allow_config_change: bool = False) -> Path:
    """Check that ``command`` may write into ``out`` (see the module docstring); writes nothing.

    Args:
        out: the ``--output`` directory.
        command: the CLI command (``stage1``, ``embed``, ``stage2``, ``llava-pretrain``...).
        cfg: the resolved run config (None: nothing to compare, e.g. ``export-tower``).
        allow_config_change: resume even when the config differs (``--allow-config-change``).

    Raises:
        RunDirError: ``out`` is a file, belongs to another command, or holds work made with
            another config.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output {out} is a file, not a directory: give a directory path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"--output {out} cannot be created: {parent} is a file")
            break
    if not out.is_dir():
        return out
    owner = infer_owner(out)
    legacy_llava = owner == "llava" and command.startswith("llava-")  # before run.json existed
    if owner is not None and owner != command and not legacy_llava:
        raise RunDirError(
            f"--output {out} holds a `{owner}` run; `{command}` will not write into it "
            "(choose another --output directory)"
        )
    sections = COMMAND_SECTIONS.get(command, ())
    old_file = out / CONFIG_FILE
    if cfg is not None and sections and old_file.is_file() and has_work(out):
        try:
            old = yaml.safe_load(old_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunDirError(
                f"{old_file} is not valid YAML ({e}); remove the run or choose another --output"
            ) from e
        changes = config_changes(old, config_io.to_dict(cfg), sections)
        if changes and not allow_config_change:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise RunDirError(
                f"--output {out} holds a `{command}` run made with another config ({shown}); resuming "
                "would mix the two. Use another --output, or --allow-config-change to resume anyway"
            )
    return out


@contextmanager
def claimed(
    out: str | Path, command: str, cfg: Any = None, *, allow_config_change: bool = False
) -> Iterator[Path]:
    """:func:`check` ``out``, run the body, then record ``command`` as its owner (``run.json``).

    The owner is recorded once the run got far enough to write its ``config.yaml`` (or, for
    commands without one, to write anything), also when it then fails or is interrupted, so a
    refused command leaves no trace. A SIGKILLed run gets its record when it is resumed.
    """
    out = check(out, command, cfg, allow_config_change=allow_config_change)
    try:
        yield out
    finally:
        started = (out / CONFIG_FILE).is_file() if cfg is not None else out.is_dir() and any(out.iterdir())
        if started and not (out / OWNER_FILE).is_file():
            (out / OWNER_FILE).write_text(json.dumps({"command": command}, indent=2) + "\n")
