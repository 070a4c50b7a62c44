"""Test-session set-up shared by every test module.

accelerate fixes one mixed precision per process (a singleton, see
``llm2clip_vlm.training.dist.make_accelerator``). Each test stands for a fresh program, so the
singletons an earlier test set up are dropped before it, as accelerate's own test suite does
(``AcceleratorState._reset_state`` is a test-only tool there too; the package never calls it).

Tests that point ``LLM2CLIP_VLM_CACHE`` at a temporary folder get it back as it was after them,
so one test's cache does not leak into the next ones: they would, for example, convert the demo
GGUF model again (~25 s) into a folder that is deleted afterwards.

Under pytest-xdist (the README's ``-n 2``) each worker is one of two processes on the machine's
cores: it runs torch on one thread, and so do the processes it starts (``OMP_NUM_THREADS``), so the
workers do not fight over the cores. A test that changes torch's thread count (a command's
``runtime.threads`` run in-process) gets it put back after it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: its thread pool size
    # An xdist worker starts with COLUMNS=80 and LINES set (the controller's terminal); rich would
    # fix the CLI console's width at 80 when it is made (at import) and wrap one-line messages.
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    # xdist hands out files (--dist loadfile) by their number of tests, most first; a one-test file
    # such as test_gpu_proof.py (~2 min) then starts last and runs alone at the end. Keep the order
    # of pytest_collection_modifyitems below instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the files that hold a ``slow`` test first (each file's tests in their order), so
    the two workers start on the long files and finish on short ones."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the rest keeps its order


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield


@pytest.fixture(autouse=True)
def _restore_cache_env() -> Iterator[None]:
    # Module-scoped fixtures are set up before this snapshot, so their setting holds for their module.
    before = os.environ.get("LLM2CLIP_VLM_CACHE")
    yield
    if before is None:
        os.environ.pop("LLM2CLIP_VLM_CACHE", None)
    else:
        os.environ["LLM2CLIP_VLM_CACHE"] = before
