"""Output directories have one owner: the command (and process) that writes them.

Before a command writes anything, :func:`check` (through :func:`claimed`) checks its ``--output``:

- it must be a directory (or not exist yet), not a file;
- it must not belong to another command: ``run.json`` names the owner (it is written when a run
  starts, so a killed ``stage1`` still owns its checkpoints and ``stage2 -o`` the same folder is
  refused, naming ``stage1``); directories written before ``run.json`` existed are recognised by
  what they hold (:func:`infer_owner`);
- when it holds finished or resumable work (a checkpoint, a model, a store), the config must be
  the one that work was made with (``config.yaml``) in every key the command reads
  (:data:`COMMAND_SECTIONS` less :data:`COMMAND_UNREAD`: a LLaVA phase reads not the other), except the
  settings that change speed only (:data:`SPEED_KEYS`: threads, workers, checkpoint frequency,
  time budget, evaluation batch). A changed ``lr`` or ``batch_size`` would otherwise silently
  mix two schedules; the refusal names the keys; ``--allow-config-change`` resumes anyway and
  ``--restart`` starts over.

Then :func:`claimed` takes the folder (:class:`Claim`):

- **a lock**: an advisory ``fcntl.flock`` on ``run.lock`` (holding the pid and the command), kept
  until the process ends (the kernel releases it when a process is killed). A second writer is
  refused in one line naming the pid and command that hold it. Only the main process of a
  multi-process run (``RANK`` 0 or unset) locks and writes; the other ranks follow it.
- **run.json at start**, written atomically: command, pid, host, argv, start time and
  ``status: starting``; ``running`` once the command's inputs are validated (:meth:`Claim.started`,
  called where ``config.yaml`` is written); ``complete`` / ``failed`` / ``interrupted`` at the end.
- **the identity of every input** (:meth:`Claim.inputs`): data files, image content, model files
  (GGUF files included), the tower, the projector, the store, the encoder. A rerun into a folder
  that holds work resumes only when they are those the work was made from; otherwise it is
  refused naming what changed and ``--restart``.
- **nothing left behind by a refusal**: a command that stops before its inputs were validated
  (a missing ``--store``, changed inputs, a bad path) restores ``run.json`` as it was, removes
  the lock file it created, and removes the folder if it created it.
- **checksums of what it made** (:meth:`Claim.record_outputs`), in ``run.json``: a command that
  reuses the output (``export-tower`` on a stage-2 run) checks them first (:func:`verify_outputs`).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from llm2clip_vlm import config_io
from llm2clip_vlm.errors import RunDirError
from llm2clip_vlm.identity import file_sha256, tree_files
from llm2clip_vlm.logging import get_logger

log = get_logger(__name__)

OWNER_FILE = "run.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = "run.lock"
RESTART_HINT = "--restart to start over"
# What a refused resume can do instead, for a command with --restart and --allow-config-change.
CONFIG_REMEDY = f"Use {RESTART_HINT}, another --output, or --allow-config-change to resume anyway"

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
# Parts of those sections a command never reads: each LLaVA phase reads the shared ``llava`` keys
# (tower, LLM, feature layer...) and its own phase, not the other one. A finetune depends on its
# pretraining through the projector's content (an input identity), not through llava.pretrain; a
# pretraining run does not depend on how a later finetune trains, so a changed finetune setting
# leaves the pretraining run resumable (``llava-compare`` reuses it).
COMMAND_UNREAD: dict[str, tuple[str, ...]] = {
    "llava-pretrain": ("llava.finetune",),
    "llava-finetune": ("llava.pretrain",),
}

# Keys (last component) that change how fast a run goes, never what it computes.
SPEED_KEYS = frozenset(
    {
        "num_workers",
        "save_every_steps",
        "keep_checkpoints",
        "max_seconds",
        "eval_batch_size",
        "threads",
        # the same update up to float rounding (llava.<phase>: micro-batch grouping, the shared prefix)
        "sort_micro_batches",
        "share_prefix",
    }
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


def config_changes(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    sections: tuple[str, ...],
    unread: tuple[str, ...] = (),
) -> list[str]:
    """``key: old -> new`` for every non-speed key of ``sections`` that differs.

    Keys under a dotted prefix of ``unread`` (``llava.finetune``) are not compared. A key missing
    from the old config (written by an older version) is not compared.
    """
    a = flatten({s: old.get(s, {}) for s in sections if s in old})
    b = flatten({s: new.get(s, {}) for s in sections})
    changes = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in SPEED_SECTIONS or key.rsplit(".", 1)[-1] in SPEED_KEYS:
            continue
        if any(key == u or key.startswith(u + ".") for u in unread):
            continue
        if key not in a:
            continue
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes


def check(
    out: str | Path,
    command: str,
    cfg: Any = None,
    *,
    allow_config_change: bool = False,
    restart: bool = False,
    remedy: str = CONFIG_REMEDY,
) -> Path:
    """Check that ``command`` may write into ``out`` (see the module docstring); writes nothing.

    Args:
        out: the ``--output`` directory.
        command: the CLI command (``stage1``, ``embed``, ``stage2``, ``llava-pretrain``...).
        cfg: the resolved run config (None: nothing to compare, e.g. ``export-tower``).
        allow_config_change: resume even when the config differs (``--allow-config-change``).
        restart: the work in ``out`` will be discarded (``--restart``): its config is not compared.
        remedy: the sentence that ends a config refusal: what the user can do (the options of
            the command that called, e.g. ``llava-compare`` has no ``--allow-config-change``).

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
        what = " (its checkpoints and results)" if has_work(out) else ""
        raise RunDirError(
            f"--output {out} holds a `{owner}` run{what}; `{command}` will not resume or overwrite "
            f"it (choose another --output directory, or rerun `{owner}` there)"
        )
    if restart:
        return out
    sections = COMMAND_SECTIONS.get(command, ())
    old_file = out / CONFIG_FILE
    if cfg is not None and sections and old_file.is_file() and has_work(out):
        try:
            old = yaml.safe_load(old_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunDirError(
                f"{old_file} is not valid YAML ({e}); remove the run or choose another --output"
            ) from e
        changes = config_changes(old, config_io.to_dict(cfg), sections, COMMAND_UNREAD.get(command, ()))
        if changes and not allow_config_change:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise RunDirError(
                f"--output {out} holds a `{command}` run made with another config ({shown}); resuming "
                f"would mix the two. {remedy}"
            )
    return out


def main_process() -> bool:
    """Whether this is the main process of a (possibly multi-process) run: ``RANK`` 0 or unset.

    accelerate and torchrun set ``RANK`` before the command starts, so the claim is decided
    before any process group exists.
    """
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def read_owner(out: Path) -> dict[str, Any]:
    """``run.json`` as a dict ({} when missing or unreadable)."""
    try:
        doc = json.loads((out / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(doc, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _lock(out: Path, command: str) -> tuple[int, bool, bytes]:
    """Take ``out/run.lock`` (exclusive, non-blocking): the fd, whether it was created, and what
    it held (the last holder's pid and command, restored if this run is refused).

    Raises:
        RunDirError: another live process holds it (its pid and command are named).
    """
    path = out / LOCK_FILE
    while True:
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = f"`{holder.get('command', '?')}` (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"
            raise RunDirError(
                f"--output {out} is in use by {who}: one run writes a folder at a time; wait for it "
                "to end, or choose another --output"
            ) from None
        except OSError as e:  # a file system without flock (some network mounts): say so, go on
            log.warning("%s: cannot lock (%s); make sure no other run writes this folder", path, e)
            return fd, created, os.pread(fd, 4096, 0)
        # The lock file may have been removed (a refused run cleaning up) between open and flock.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    before = os.pread(fd, 4096, 0)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command, "since": _now()}).encode(), 0)
    return fd, created, before


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two input records, one phrase per input (``tower: a/b.safetensors changed``).

    An input the old record lacks (written by an older version) is not compared.
    """
    changes = []
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            added, removed = sorted(set(b) - set(a)), sorted(set(a) - set(b))
            parts = [f"{k} changed" if b[k] != "missing" else f"{k} missing" for k in changed[:2]]
            parts += [f"{k} added" for k in added[:2]] + [f"{k} removed" for k in removed[:2]]
            more = len(changed) + len(added) + len(removed) - len(parts)
            changes.append(f"{name}: {', '.join(parts)}" + (f" and {more} more" if more > 0 else ""))
        else:
            changes.append(f"{name}: content changed")
    return changes


class Claim:
    """One command's hold on its output folder (see the module docstring); made by :func:`claimed`.

    Attributes:
        out: the folder.
        command: the command that holds it.
        main: whether this process writes (the main process); on other ranks every method is a no-op.
    """

    def __init__(self, out: Path, command: str, main: bool = True) -> None:
        self.out, self.command, self.main = out, command, main
        self.doc: dict[str, Any] = {}
        self.previous: dict[str, Any] = {}  # run.json as it was (what the work was made from)
        self.previous_bytes: bytes | None = None
        self.had_work = False
        self.fd: int | None = None
        self.created_dir = self.created_lock = False
        self.lock_before = b""

    # -- called by the command ------------------------------------------------------------------
    def inputs(self, identities: Mapping[str, Any], *, compare: bool = True) -> None:
        """Compare the identities of this run's inputs with those its work was made from; record them.

        ``compare=False`` records only (``embed``: its stores compare their own inputs).

        Raises:
            RunDirError: the folder holds work made from other inputs (the message names them).
        """
        if not self.main:
            return
        old = self.previous.get("inputs") or {}
        if self.had_work and old and compare:
            changes = describe_changes(old, identities)
            if changes:
                shown = "; ".join(changes[:4]) + (
                    f"; and {len(changes) - 4} more" if len(changes) > 4 else ""
                )
                raise RunDirError(
                    f"--output {self.out} holds a `{self.command}` run made from other inputs ({shown}); "
                    f"resuming would mix the two. Use {RESTART_HINT}, or another --output"
                )
        self.doc["inputs"] = dict(identities)
        self._write()

    def started(self) -> None:
        """The inputs are validated and the run begins writing its results (``status: running``)."""
        if self.main and self.doc.get("status") == "starting":
            self.doc["status"] = "running"
            self._write()

    def record_outputs(self, paths: list[str]) -> None:
        """Record size, mtime and sha256 of every file under ``paths`` (relative to the folder)."""
        if not self.main:
            return
        self.doc["outputs"] = output_checksums(self.out, paths)
        self._write()

    # -- lifecycle ------------------------------------------------------------------------------
    def _write(self) -> None:
        _write_atomic(self.out / OWNER_FILE, self.doc)

    def open(self, *, restart: bool = False, started: bool = False) -> None:
        if not self.main:
            return
        self.created_dir = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.fd, self.created_lock, self.lock_before = _lock(self.out, self.command)
        except BaseException:
            if self.created_dir:
                shutil.rmtree(self.out, ignore_errors=True)
            raise
        owner_file = self.out / OWNER_FILE
        self.previous_bytes = owner_file.read_bytes() if owner_file.is_file() else None
        self.previous = read_owner(self.out)
        self.had_work = has_work(self.out)
        if restart and self.had_work:
            log.warning("--restart: removing the earlier `%s` run in %s", self.command, self.out)
            for p in self.out.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.previous, self.previous_bytes, self.had_work = {}, None, False
        self.doc = {
            "command": self.command,
            "status": "running" if started else "starting",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "argv": sys.argv[1:],
            "started": _now(),
        }
        # Kept until this run replaces them: a run killed before it compared its inputs must not
        # leave a record that lets the next one resume without comparing.
        for key in ("inputs", "outputs"):
            if key in self.previous:
                self.doc[key] = self.previous[key]
        self._write()

    def close(self, error: BaseException | None) -> None:
        if not self.main or self.fd is None:
            return
        try:
            if error is not None and self.doc.get("status") == "starting":
                self._roll_back()
                return
            if error is None:
                self.doc["status"] = "complete"
            else:
                interrupted = isinstance(error, KeyboardInterrupt) or "Interrupted" in type(error).__name__
                self.doc["status"] = "interrupted" if interrupted else "failed"
                self.doc["error"] = (str(error).splitlines() or [type(error).__name__])[0][:500]
            self.doc["ended"] = _now()
            self._write()
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None

    def _roll_back(self) -> None:
        """A refused run: leave the folder as it was (the lock is still held while cleaning)."""
        if self.created_dir:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        owner_file = self.out / OWNER_FILE
        if self.previous_bytes is not None:
            owner_file.write_bytes(self.previous_bytes)
        else:
            owner_file.unlink(missing_ok=True)
        if self.created_lock:
            (self.out / LOCK_FILE).unlink(missing_ok=True)
        elif self.fd is not None:  # the last holder's record, as it was
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self.lock_before, 0)


@contextmanager
def claimed(
    out: str | Path,
    command: str,
    cfg: Any = None,
    *,
    allow_config_change: bool = False,
    restart: bool = False,
    started: bool = False,
) -> Iterator[Claim]:
    """:func:`check` ``out``, take it (:class:`Claim`: lock, ``run.json``), run the body, release it.

    Args:
        out, command, cfg, allow_config_change: as for :func:`check`.
        restart: discard the earlier run of ``command`` in ``out`` (``--restart``).
        started: the command has no input validation to wait for (``status: running`` at once);
            otherwise it calls :meth:`Claim.started` once its inputs are usable, and a failure
            before that leaves the folder as it was.
    """
    main = main_process()
    if main:  # the other ranks follow the main process (they must not be refused by its lock)
        out = check(out, command, cfg, allow_config_change=allow_config_change, restart=restart)
    claim = Claim(Path(out), command, main)
    claim.open(restart=restart, started=started)
    if main:
        try:  # again, under the lock: a run may have claimed the folder since the first check
            check(out, command, cfg, allow_config_change=allow_config_change, restart=restart)
        except BaseException as e:
            claim.close(e)
            raise
    try:
        yield claim
    except BaseException as e:
        claim.close(e)
        raise
    claim.close(None)


def hold(out: Path, command: str) -> Claim:
    """Take ``out`` for ``command`` without the checks (``build-tower``'s stage folders: their
    stamps decide what is reused); release it with ``close(error)``."""
    claim = Claim(Path(out), command, main_process())
    claim.open(started=True)
    return claim


def output_checksums(root: Path, paths: list[str]) -> dict[str, dict[str, Any]]:
    """``{relative file: {size, mtime_ns, sha256}}`` of every file under ``root/<path>``."""
    files: list[Path] = []
    for rel in paths:
        p = root / rel
        files += [p] if p.is_file() else tree_files(p)
    out = {}
    for f in files:
        st = f.stat()
        out[str(f.relative_to(root))] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": file_sha256(f),
        }
    return out


def verify_outputs(root: Path, recorded: Mapping[str, Mapping[str, Any]], full: bool = False) -> list[str]:
    """What differs from the checksums the files under ``root`` were written with (empty: intact).

    A file whose size and mtime are as recorded is trusted unless ``full`` (then every file is
    re-hashed); any other file is re-hashed and compared.
    """
    problems = []
    for rel, rec in sorted(recorded.items()):
        f = root / rel
        if not f.is_file():
            problems.append(f"{f} is missing")
            continue
        st = f.stat()
        if st.st_size != rec.get("size"):
            problems.append(f"{f} is {st.st_size} bytes, {rec.get('size')} were written")
        elif (full or st.st_mtime_ns != rec.get("mtime_ns")) and file_sha256(f) != rec.get("sha256"):
            problems.append(f"{f}: its sha256 differs from the one it was written with")
    return problems


def checked_outputs(run: Path, what: str, full: bool = False) -> None:
    """Refuse a run's outputs that changed since it wrote them (its ``run.json`` checksums).

    Raises:
        RunDirError: one line naming the first changed file.
    """
    recorded = read_owner(run).get("outputs") or {}
    problems = verify_outputs(run, recorded, full)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise RunDirError(
            f"{what} {run} was changed after it was written: {problems[0]}{more}; it is not reused "
            "(rerun the command that made it)"
        )
