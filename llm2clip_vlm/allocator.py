"""glibc malloc settings for a CPU run: keep freed tensor memory in the process.

By default glibc serves every allocation above a (dynamic) threshold of 128 KiB with its own
``mmap`` and hands it back with ``munmap`` when it is freed, and trims the heap's free top back to
the OS above 128 KiB. A CPU training step or an embedding batch allocates and frees hundreds of
such activation tensors; freed at the heap's top or unmapped, their pages go back to the OS, and
the next step maps fresh ones and faults each in again (the kernel zeroes every page). Measured on the demo (2026-12-06, loaded, one thread; docs/BENCHMARKS.md,
"The demo build's time"): an embedding pass had 0.7-1.3 M minor page faults and 1-2 s
of system time per 640 captions by default, 80 k and 0.2 s with these settings, and 2-3 % less
CPU time in all; a 25-step stage-1 run 1.68 M faults against 0.70 M, peak RSS +3 %.

Allocations up to 32 MiB (glibc's ceiling for this setting on 64-bit) then come from the heap and
are reused, and up to 1 GiB of free heap top stays mapped. The numbers computed do not change:
only where the bytes live.

A leaf module (imports nothing of the package): the CLI calls :func:`keep_freed_memory` first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1024 * 1024 * 1024
# The environment variables through which a user sets these themselves: theirs win.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring).

    Does nothing where the C library is not glibc (musl, macOS), or where the user set malloc's
    thresholds through the environment.

    Returns:
        Whether both settings were applied.
    """
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    if not os.confstr_names.get("CS_GNU_LIBC_VERSION"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, ValueError, AttributeError):  # no glibc to talk to
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error (a value out of range).
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["keep_freed_memory"]
