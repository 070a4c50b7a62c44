"""Fresh CLI processes without paying the third-party imports each time: a fork server for tests.

A fault test wants what a user meets: ``python -m llm2clip_vlm.cli ...`` in its own process, with
its own exit status, signal handlers and global state. Most of such a process's time on tiny data
is importing torch, transformers, peft and accelerate (~4-6 s of CPU each). The server imports
those once, then forks one child per command. The child is a new process (its own pid: it can be
SIGTERMed or SIGKILLed; its exit status is the process's, reaped by the server) that runs the
command exactly as ``python -m llm2clip_vlm.cli ARGS`` (or ``python -c CODE``) would:
``llm2clip_vlm`` itself is never imported by the server, so every package module (and every patch a
``-c`` script applies before ``main()``) loads fresh in the child, as in a new interpreter.

What differs from a new interpreter is only what was imported before the fork: third-party modules
that read environment variables at import time read the server's environment. So a command asks
for the server only with the server's environment, give or take :data:`CALL_TIME_ENV` (variables
the package reads when it runs); any other environment gets a real ``subprocess.Popen``. At exit
the child runs the atexit handlers and flushes its streams, as the interpreter does, but does not
tear down the inherited module objects (that would copy the server's whole heap, ~2 s a command).
``LLM2CLIP_TEST_NO_FORK=1`` runs every command in a new interpreter instead.

``Process`` has the part of ``subprocess.Popen``'s interface the tests use (``pid``, ``poll``,
``wait``, ``communicate``, ``send_signal``, ``kill``, ``returncode``: ``-N`` when killed by signal N).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The environment of a test's CLI process (and of the server): one torch thread, no warnings, wide
# enough that rich keeps each message on one line.
ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    PYTHONWARNINGS="ignore",
    COLUMNS="250",
    PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
)
CALL_TIME_ENV = {"LLM2CLIP_VLM_CACHE", "COLUMNS"}  # read by the package when a command runs

# The server: imports, then one fork per request line (JSON) on stdin; replies {"pid": N} on stdout.
# A SIGCHLD handler reaps children and writes each exit status to STATUS_DIR/<pid> (Popen's
# convention: -N when killed by signal N). No Python thread runs in it; the native libraries' idle
# pools (OpenBLAS, Arrow) handle fork as they do for DataLoader workers forked from a trainer.
_SERVER = r"""
import atexit, gc, json, os, signal, sys
status_dir = sys.argv[1]
import numpy, PIL.Image, safetensors.torch, torch, torch.distributed, yaml, rich.console, typer  # noqa
import transformers, accelerate, peft, pyarrow, pyarrow.parquet  # noqa
from transformers import (CLIPVisionModel, LlamaForCausalLM, LlamaModel, LlavaForConditionalGeneration,  # noqa
                          SiglipVisionModel, AutoTokenizer, CLIPImageProcessor)

def reap(signum, frame):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        tmp = os.path.join(status_dir, f"{pid}.tmp")
        with open(tmp, "w") as f:
            f.write(str(code))
        os.replace(tmp, os.path.join(status_dir, str(pid)))

signal.signal(signal.SIGCHLD, reap)
gc.collect()
gc.freeze()  # the imported objects: never scanned by a child's collector (no copy-on-write of them)
print(json.dumps({"ready": os.getpid()}), flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.close(null)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        try:
            if req["code"] is not None:
                sys.argv = ["-c", *req["argv"]]
                exec(compile(req["code"], "<string>", "exec"), {"__name__": "__main__"})
            else:
                import runpy
                sys.argv = ["llm2clip-vlm", *req["argv"]]
                runpy.run_module("llm2clip_vlm.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # as the interpreter exits: None 0, an int itself, else printed and 1
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:  # dies by SIGINT, as the interpreter does
            code = 130
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # The interpreter's exit, less the teardown of every module object (which would touch, so
        # copy, the whole inherited heap): atexit handlers, flushed streams, then the status.
        try:
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code & 0xFF)
    print(json.dumps({"pid": pid}), flush=True)
"""


class _Server:
    """One server process (per test process), started on first use, stopped at exit."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.status_dir = Path(tempfile.mkdtemp(prefix="cli-fork-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(self.status_dir)],
            env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lock = threading.Lock()
        ready = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not ready:
            raise RuntimeError("the CLI fork server did not start")
        atexit.register(self.close)

    def spawn(
        self, argv: list[str], code: str | None, env: dict[str, str], cwd: Path, out: Path, err: Path
    ) -> int:
        req = {
            "argv": argv,
            "code": code,
            "env": env,
            "cwd": str(cwd),
            "stdout": str(out),
            "stderr": str(err),
        }
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            reply = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not reply:
            raise RuntimeError("the CLI fork server stopped")
        return int(json.loads(reply)["pid"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.status_dir, ignore_errors=True)


_the_server: _Server | None = None


def _server() -> _Server:
    """The one server (with :data:`ENV`: every forked command runs with it but for CALL_TIME_ENV)."""
    global _the_server
    if _the_server is None:
        _the_server = _Server(ENV)
    return _the_server


class Process:
    """A command run by the fork server (``subprocess.Popen``-like, text mode)."""

    def __init__(
        self, server: _Server, argv: list[str], code: str | None, env: dict[str, str], cwd: Path
    ) -> None:
        self._server = server
        self._files = tempfile.mkdtemp(prefix="cli-run-", dir=server.status_dir)
        self._out, self._err = Path(self._files) / "stdout", Path(self._files) / "stderr"
        self.pid = server.spawn(argv, code, env, cwd, self._out, self._err)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            status = self._server.status_dir / str(self.pid)
            if status.is_file():
                self.returncode = int(status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["llm2clip-vlm"], timeout)  # type: ignore[arg-type]
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        read = lambda p: p.read_text(errors="replace") if p.is_file() else ""  # noqa: E731
        return read(self._out), read(self._err)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it exited between the poll and the signal
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(
    argv: list[str], *, code: str | None = None, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Process | subprocess.Popen[str]:
    """``python -m llm2clip_vlm.cli ARGV`` (or ``python -c CODE ARGV``) in a new process, with
    ``env`` (default :data:`ENV`): forked from the server when ``env`` is :data:`ENV` but for
    :data:`CALL_TIME_ENV`, else a real interpreter."""
    env = ENV if env is None else env
    differs = {k for k in env.keys() | ENV.keys() if env.get(k) != ENV.get(k)}
    if differs <= CALL_TIME_ENV and os.environ.get("LLM2CLIP_TEST_NO_FORK") != "1":
        return Process(_server(), argv, code, env, cwd)
    head = [sys.executable, "-c", code] if code is not None else [sys.executable, "-m", "llm2clip_vlm.cli"]
    return subprocess.Popen([*head, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def run(
    argv: list[str], *, code: str | None = None, env: dict[str, str] | None = None, cwd: Path = ROOT,
    timeout: float = 600,
) -> tuple[int, str, str]:  # fmt: skip
    """:func:`start`, then wait: (exit status, stdout, stderr)."""
    p = start(argv, code=code, env=env, cwd=cwd)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return p.returncode, out, err  # type: ignore[return-value]
