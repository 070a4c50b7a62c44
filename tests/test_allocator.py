"""glibc malloc settings at CLI start-up (issue 28: the demo's time): applied where glibc is, left
to the user where they set them, and observable in the process's page faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from llm2clip_vlm.allocator import USER_SETTINGS, keep_freed_memory

GLIBC = bool(os.confstr_names.get("CS_GNU_LIBC_VERSION")) and bool(os.confstr("CS_GNU_LIBC_VERSION"))

# A step's pattern: eight 4 MiB activations live at once, then all freed, 50 times. With glibc's
# defaults the first round is mmapped, later rounds come from the heap, and freeing them leaves
# 32 MiB free at the heap's top, over the (dynamic) 8 MiB trim threshold: it goes back to the OS
# and its 8192 pages fault in again next round. Kept, the same pages serve every round.
CHURN = textwrap.dedent(
    """
    import resource, sys
    from llm2clip_vlm.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        live = [bytearray(4 * 1024 * 1024) for _ in range(8)]  # zero-filled: every page touched
        del live
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _churn(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    applied, kept = _churn("keep")
    _, default = _churn("default")
    assert applied
    # Default: ~50 x 8192 faults. Kept: the first round's pages only (plus noise).
    assert default > 200_000, default
    assert kept < default / 10, (kept, default)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_the_users_own_malloc_settings_win() -> None:
    applied, faults = _churn("keep", {"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert not applied
    assert faults > 200_000  # their (small) threshold holds: every block is mapped afresh


def test_without_glibc_nothing_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "confstr", lambda name: None)
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert keep_freed_memory() is False
