"""Checkpoints every trainer shares: atomic, complete, exactly resumable.

What a checkpoint holds (one folder ``<root>/step-0000042/``):

- ``model.safetensors``: the weights the caller passes (full model, LoRA adapter, projector, ...);
  never pickled;
- ``optimizer.pt`` (``optimizer.rank<r>.pt`` per rank under FSDP), ``scheduler.pt``, ``scaler.pt``:
  written with ``torch.save`` and read back **only** with ``torch.load(..., weights_only=True)``;
- ``rng.rank<r>.safetensors``: python, numpy, torch CPU and CUDA generator states of every rank;
- ``sharded/`` (FSDP2 runs, :mod:`llm2clip_vlm.training.fsdp`) instead of ``model.safetensors`` and
  ``optimizer*.pt``: every rank's shards of the weights and the optimizer state, as safetensors
  (``torch.distributed.checkpoint``'s safetensors storage) plus the optimizer's settings as JSON;
- ``checkpoint.json``, written last: step, the caller's trainer state (data position, history),
  the world size and the size and sha256 of every file (a truncated or corrupted file is refused
  on load, naming it).

[IMPORTANT] Writing: everything goes to ``<root>/.tmp-step-N``, every file is fsync'ed, then the
folder is renamed into place and the root fsync'ed. Older checkpoints are pruned only *after* the
new one is complete, so a kill or a full disk at any moment leaves the last good checkpoint
usable; a failed write raises :class:`CheckpointWriteError` naming the checkpoint that is still
good. Weights that are not finite are never written (:class:`NonFiniteError`).

Usage (any accelerate trainer; ``accelerator`` may be None for a plain single process)::

    from llm2clip_vlm.signals import GracefulExit
    from llm2clip_vlm.training.checkpoint import Checkpointer
    from llm2clip_vlm.training.guards import NonFiniteGuard

    ckpt = Checkpointer(out / "checkpoints", accelerator, keep=2)
    resumed = ckpt.load(optimizer=optimizer, scheduler=scheduler)  # None on a fresh run
    state = {"step": 0, "losses": []}
    if resumed:
        model.load_state_dict(resumed.weights, strict=False)  # (before accelerator.prepare)
        state = resumed.state
    guard = NonFiniteGuard("llava", skip=cfg.reliability.skip_nonfinite_steps)
    with GracefulExit(agree=lambda flag: dist.any_rank(accelerator, flag)) as stop:
        for batch in batches_from(state["step"]):
            if resumed:  # RNG as it was right after the saved step (after the loader started)
                resumed.restore_rng()
                resumed = None
            loss = ...; accelerator.backward(loss)
            if guard.check(loss_value, state["step"] + 1, grad_norm):
                optimizer.step()
            scheduler.step(); optimizer.zero_grad()
            state["step"] += 1
            if state["step"] % every == 0 or stop.should_stop():
                ckpt.save(state["step"], weights=trainable_state_dict(model), optimizer=optimizer,
                          scheduler=scheduler, state=state)
            stop.raise_if_requested(ckpt.latest())  # TrainingInterrupted after a save
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from llm2clip_vlm import resources
from llm2clip_vlm.identity import file_sha256
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.training import dist
from llm2clip_vlm.training.guards import NonFiniteError, check_finite_weights
from llm2clip_vlm.training.rng import rng_state, set_rng_state

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"  # a run's checkpoint folder, under its output directory
PREFIX = "step-"
META = "checkpoint.json"
WEIGHTS = "model.safetensors"
SHARDED = "sharded"  # FSDP2 shards (training.fsdp.SHARDED_DIR)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read (the message names it and what is still good)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. disk full); the previous checkpoint is untouched."""


# --------------------------------------------------------------------------------------------
# Files: fsync'ed writes
# --------------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_files(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each file, in threads (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: file_sha256(folder / name), names), strict=True))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's own safetensors file (never a pickle), refused in one line when unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise CheckpointError(f"{path}: cannot read the safetensors file ({type(e).__name__}: {e})") from e


def _save_tensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _bytes_needed(weights: Mapping[str, torch.Tensor] | None, optimizer: Any = None) -> int:
    """About what a checkpoint of ``weights`` (and the optimizer's tensors) takes on disk."""
    tensors = list((weights or {}).values())
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _save_pickle(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def _write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2))


def _write(writer: Callable[[Any, Path], None], obj: Any, path: Path) -> None:
    writer(obj, path)
    _fsync(path)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
@dataclass
class Resumed:
    """A loaded checkpoint: its weights and trainer state, and this rank's RNG state to restore.

    Attributes:
        path: the checkpoint folder.
        step: the step it was written after.
        weights: the saved tensors (CPU), for ``model.load_state_dict``.
        state: the caller's trainer-state dict (data position, history, ...).
    """

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    _rng: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None

    @property
    def sharded(self) -> bool:
        """Whether it holds FSDP2 shards (``sharded/``) instead of ``model.safetensors``."""
        return (self.path / SHARDED).is_dir()

    def restore_rng(self) -> None:
        """Put every generator back to where it was when the checkpoint was written.

        Call it at the point of the loop that corresponds to the save (right before the next
        step's forward, after the data loader was started), so dropout, masking and sampling
        continue exactly as in an uninterrupted run.
        """
        if self._rng is not None:
            set_rng_state(*self._rng)


class Checkpointer:
    """Writes and finds the checkpoints of one run under ``root``.

    Args:
        root: folder of the run's checkpoints (``step-NNNNNNN`` subfolders).
        accelerator: the run's ``accelerate.Accelerator`` (None: one plain process).
        keep: how many complete checkpoints to keep (the newest; at least 1).
    """

    def __init__(self, root: str | Path, accelerator: Any = None, keep: int = 2) -> None:
        self.root = Path(root)
        self.accelerator = accelerator
        self.keep = max(1, keep)

    # -- finding ---------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its ``checkpoint.json`` is in)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found) if (p / META).is_file()]

    def latest(self) -> Path | None:
        """The newest complete checkpoint (None if there is none)."""
        done = self.complete()
        return done[-1] if done else None

    # -- writing ---------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        weights: Mapping[str, torch.Tensor] | None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        state: Mapping[str, Any] | None = None,
        sharded: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` atomically; every process must call it.

        Args:
            step: optimizer steps done (the folder's name).
            weights: tensors to save (only the main process's are written; may be None elsewhere).
                Refused when not finite.
            optimizer, scheduler, scaler: saved with their ``state_dict()`` if given.
            state: JSON-serialisable trainer state (data position, losses, ...).
            sharded: writes every rank's shards into the (temporary) checkpoint folder it is
                given; called on every rank (a collective; FSDP2's weights and optimizer state).

        Returns:
            The checkpoint folder.

        Raises:
            NonFiniteError: the weights hold NaN/inf (nothing is written).
            CheckpointWriteError: a write failed (disk full, ...); the previous checkpoint is kept.
        """
        acc, main, rank = self.accelerator, dist.is_main(self.accelerator), dist.rank(self.accelerator)
        final = self.root / f"{PREFIX}{step:07d}"
        tmp = self.root / f".tmp-{PREFIX}{step:07d}"
        bad = None
        if main and weights is not None:
            try:
                check_finite_weights(weights, f"checkpoint {final.name}")
            except NonFiniteError as e:
                bad = e
        if dist.any_rank(acc, bad is not None):
            raise bad or NonFiniteError(f"checkpoint {final.name}: another process found NaN/inf weights")

        error: BaseException | None = None
        try:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as e:
            error = resources.classify(e, tmp) or e
        dist.barrier(acc)
        if error is None and tmp.is_dir():
            try:
                tensors, meta = rng_state()
                _write(lambda o, p: _save_tensors(o, p, meta), tensors, tmp / f"rng.rank{rank}.safetensors")
                if sharded is not None:
                    sharded(tmp)
                if optimizer is not None and (main or dist.sharded_optimizer(acc)):
                    name = f"optimizer.rank{rank}.pt" if dist.sharded_optimizer(acc) else "optimizer.pt"
                    _write(_save_pickle, optimizer.state_dict(), tmp / name)
                if main:
                    if weights is not None:
                        _write(lambda o, p: _save_tensors(o, p, {"format": "pt"}), weights, tmp / WEIGHTS)
                    if scheduler is not None:
                        _write(_save_pickle, scheduler.state_dict(), tmp / "scheduler.pt")
                    if scaler is not None:
                        _write(_save_pickle, scaler.state_dict(), tmp / "scaler.pt")
            except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: a RuntimeError
                error = resources.classify(e, tmp, lambda: _bytes_needed(weights, optimizer)) or e
        elif error is None:
            error = OSError(errno.ENOENT, "temporary checkpoint folder missing", str(tmp))
        failed = dist.any_rank(acc, error is not None)
        if not failed:
            dist.barrier(acc)
            try:
                if main:
                    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
                    for sub in {p for p in tmp.rglob("*") if p.is_dir()}:
                        _fsync(sub)
                    files = {n: (tmp / n).stat().st_size for n in names}
                    meta_doc = {
                        "step": step,
                        "world_size": dist.world(acc),
                        "files": files,
                        "sha256": _sha256_files(tmp, names),
                        "state": dict(state or {}),
                    }
                    _write(_write_json, meta_doc, tmp / META)
                    _fsync(tmp)
                    self._swap_in(tmp, final)
            except OSError as e:
                error = resources.classify(e, tmp) or e
            failed = dist.any_rank(acc, error is not None)
        if failed:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            good = self.latest()
            reason = error or "another process failed to write its part"
            raise CheckpointWriteError(
                f"could not write checkpoint {final}: {reason}; "
                + (f"the last good checkpoint {good} is intact" if good else "no earlier checkpoint exists")
            ) from error
        if main:
            self._prune()
        dist.barrier(acc)
        log.info("checkpoint %s written", final)
        return final

    def _swap_in(self, tmp: Path, final: Path) -> None:
        old = final.with_name(f".old-{final.name}")
        if final.exists():  # the same step saved again (e.g. after a signal): keep it until replaced
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        os.replace(tmp, final)
        _fsync(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- reading ---------------------------------------------------------------------------
    def load(
        self,
        path: str | Path | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        with_weights: bool = True,
        same_world_size: bool = False,
    ) -> Resumed | None:
        """Load a checkpoint (default: the newest complete one) into optimizer/scheduler/scaler.

        To load weights before ``accelerator.prepare`` and the optimizer after it (FSDP), call it
        twice: ``load()`` first, then ``load(resumed.path, optimizer=..., with_weights=False)``.

        Weights come back in :attr:`Resumed.weights` (load them into the model yourself, so the
        caller decides on strictness and on before/after ``accelerator.prepare``); the RNG is
        restored by :meth:`Resumed.restore_rng` at the right moment of the loop.

        ``same_world_size`` refuses a checkpoint written by another number of processes even when
        the optimizer is not sharded (trainers whose data slices or RNG streams are per rank).

        Returns:
            None when there is no checkpoint.

        Raises:
            CheckpointError: the checkpoint is incomplete, truncated, from another number of
                processes, or holds something ``torch.load(weights_only=True)`` refuses.
        """
        ckpt = Path(path) if path is not None else self.latest()
        if ckpt is None:
            return None
        rank = dist.rank(self.accelerator)
        try:
            meta = json.loads((ckpt / META).read_text())
            self._check_files(ckpt, meta)
            world = dist.world(self.accelerator)
            if int(meta.get("world_size", world)) != world and (
                same_world_size or dist.sharded_optimizer(self.accelerator)
            ):
                raise CheckpointError(
                    f"written by {meta['world_size']} processes; resume it with the same number (now {world})"
                )
            weights = _read_tensors(ckpt / WEIGHTS) if with_weights and (ckpt / WEIGHTS).is_file() else {}
            if optimizer is not None:
                name = (
                    f"optimizer.rank{rank}.pt" if dist.sharded_optimizer(self.accelerator) else "optimizer.pt"
                )
                optimizer.load_state_dict(torch.load(ckpt / name, map_location="cpu", weights_only=True))
            if scheduler is not None:
                scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            if scaler is not None and (ckpt / "scaler.pt").is_file():
                scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=True))
            rng = None
            rng_file = ckpt / f"rng.rank{rank}.safetensors"
            if rng_file.is_file():
                from safetensors import safe_open

                with safe_open(str(rng_file), framework="pt") as f:
                    rng = ({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}))
            else:
                log.warning(
                    "%s has no RNG state for rank %d: dropout/sampling will not continue exactly", ckpt, rank
                )
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {ckpt} cannot be resumed from: {e}") from e
        # UnpicklingError: what torch.load(weights_only=True) raises for a pickle holding code.
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as e:
            raise CheckpointError(
                f"checkpoint {ckpt} cannot be resumed from: {type(e).__name__}: {e} "
                "(remove it to fall back to an older one)"
            ) from e
        # Debug only: the training loop names the stage in its own "resuming from" line, and it
        # calls this twice (weights first, optimizer after prepare), which logged it twice.
        log.debug("resuming from %s (step %d)", ckpt, meta["step"])
        return Resumed(ckpt, int(meta["step"]), weights, dict(meta.get("state", {})), rng)

    @staticmethod
    def _check_files(ckpt: Path, meta: dict[str, Any]) -> None:
        for name, size in meta.get("files", {}).items():
            f = ckpt / name
            if not f.is_file():
                raise CheckpointError(f"{name} is missing")
            if f.stat().st_size != size:
                raise CheckpointError(f"{name} is {f.stat().st_size} bytes, {size} were written (truncated?)")
        # Checkpoints written before checksums existed have none: sizes are all that can be checked.
        expected = meta.get("sha256", {})
        actual = _sha256_files(ckpt, sorted(expected))
        for name in sorted(expected):
            if actual[name] != expected[name]:
                raise CheckpointError(
                    f"{ckpt / name} is corrupt: its sha256 differs from the one written with it "
                    "(remove the checkpoint to fall back to an older one)"
                )
