"""The running environment is the one the lock file describes (requirements/lock-cpu.txt).

A fresh machine installs through scripts/install.sh with the lock as constraints; these tests fail
when an installed package drifted from its locked version, or when the package gained a dependency
that nobody locked (then a fresh install would pull whatever release is newest that day).
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path(os.environ.get("LLM2CLIP_LOCK", ROOT / "requirements" / "lock-cpu.txt"))
# Pinned outside the lock: torch through TORCH_SPEC (a CUDA build on GPU machines brings its own
# nvidia-*/triton wheels), the packaging tools, and this package itself.
NOT_LOCKED = {"torch", "pip", "setuptools", "wheel", "llm2clip-vlm"}


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{path.name}: not an exact pin: {line!r}"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


pytestmark = pytest.mark.skipif(
    os.environ.get("LLM2CLIP_LOCK") == "none", reason="installed without a lock (LLM2CLIP_LOCK=none)"
)


def test_lock_parses_and_excludes_torch() -> None:
    pins = read_lock(LOCK)
    assert len(pins) > 50
    assert "torch" not in pins and "llm2clip-vlm" not in pins
    # The known break: filelock 4.3.1 removed filelock._api, which lmms-eval 0.7.3 imports.
    assert tuple(int(x) for x in pins["filelock"].split(".")[:3]) < (4, 3, 1)


def test_installed_versions_match_the_lock() -> None:
    pins = read_lock(LOCK)
    drift = []
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an optional part not installed here (e.g. LLM2CLIP_EVAL=0)
        if installed != version:
            drift.append(f"{name}: installed {installed}, locked {version}")
    assert not drift, "environment differs from the lock:\n" + "\n".join(drift)


def _closure(root: str, extras: set[str]) -> set[str]:
    """Installed distributions that ``root[extras]`` needs, transitively."""
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (wanted or {""})
            ):
                continue
            key = canonicalize_name(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((key, set(req.extras)))
    return seen


def test_every_dependency_is_locked() -> None:
    pins = read_lock(LOCK)
    needed = _closure("llm2clip-vlm", {"dev"})
    installed = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()}
    unlocked = sorted(n for n in needed & installed if n not in pins and n not in NOT_LOCKED)
    assert not unlocked, f"installed dependencies missing from {LOCK.name}: {unlocked} (run scripts/lock.sh)"
