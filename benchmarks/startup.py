"""Time to SERVING of the default sidecar, cold (empty --cache-dir) and warm (a restart on the same one).

The sidecar serves a MiniLM-L6-shaped cross-encoder (the benchmark model of ``engines.py``) with the
packaged all-MiniLM-L6-v2 embedder on, every other setting at its default: ``--engine auto
--precision auto --torch-compile auto``. Each run starts a subprocess on a fresh cache directory
(cold), waits until the health service reports SERVING, stops it, then starts it again on the same
directory (warm). Time to SERVING is measured from spawning the process; the phase breakdown comes
from the sidecar's own log line per model (load, export, build, gate, timing, warm-up), and with
``--wait-compiled`` the warm run also waits for the background compile to take over.

    .venv/bin/python -m benchmarks.startup [--runs 3] [--out benchmarks/out/startup.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.engines import OUT, REPO, build_model, free_port, hardware_record

_READY = re.compile(
    r"(?P<model>\S+) ready on (?P<engine>\S+) in (?P<total>[\d.]+) s: (?P<phases>.*)$", re.MULTILINE
)
_PHASE = re.compile(r"(?P<phase>[\w-]+) (?P<seconds>[\d.]+) s")
_COMPILED = re.compile(r"(?P<model>\S+) now serves compiled .* after (?P<seconds>[\d.]+) s of compiling")


@dataclass
class Start:
    kind: str
    seconds_to_serving: float
    # Per model: the engine it serves with and the seconds of each loading phase.
    models: dict[str, dict[str, object]] = field(default_factory=dict)
    # Per model: seconds the background compile took, once it took over (--wait-compiled).
    compiled_after: dict[str, float] = field(default_factory=dict)


def start(model_dir: Path, cache_dir: Path, kind: str, wait_compiled: bool) -> Start:
    port = free_port()
    log_path = cache_dir.parent / f"{kind}.log"
    command = [sys.executable, "-m", "sidecar", "--model", str(model_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", "0", "--cache-dir", str(cache_dir)]
    command += ["--log-format", "text"]
    with log_path.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            seconds = _wait_serving(port, process, started)
            result = Start(kind, seconds)
            # Only a torch engine compiles in the background (--torch-compile auto).
            compiling = {model for model, engine in _ready(log_path).items() if engine.startswith("torch/")}
            deadline = time.monotonic() + 600
            while wait_compiled and compiling and time.monotonic() < deadline and process.poll() is None:
                text = log_path.read_text()
                compiled = {match["model"]: float(match["seconds"]) for match in _COMPILED.finditer(text)}
                if compiling <= set(compiled) or " compiled: " in text:  # all compiled, or one failed
                    result.compiled_after = compiled
                    break
                time.sleep(1)
        finally:
            process.terminate()
            process.wait(timeout=120)
    for line in log_path.read_text().splitlines():
        if match := _READY.search(line):
            phases = {m["phase"]: float(m["seconds"]) for m in _PHASE.finditer(match["phases"])}
            result.models[match["model"]] = {
                "engine": match["engine"],
                "seconds": float(match["total"]),
                **phases,
            }
    return result


def _ready(log_path: Path) -> dict[str, str]:
    """The engine each model is ready on, from the sidecar's log."""
    return {match["model"]: match["engine"] for match in _READY.finditer(log_path.read_text())}


def _wait_serving(port: int, process: subprocess.Popen[bytes], started: float) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            if process.poll() is not None:
                raise RuntimeError(f"the sidecar exited with status {process.returncode} before SERVING")
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="cold and warm starts, each on a fresh cache")
    parser.add_argument(
        "--wait-compiled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the warm run go on until the background compile takes over, and time it",
    )
    parser.add_argument("--out", type=Path, default=OUT / "startup.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(OUT / "minilm-l6-cross-encoder")
    starts: list[Start] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="rerank-startup-") as scratch:
            cache_dir = Path(scratch) / "cache"
            for kind in ("cold", "warm"):
                result = start(
                    model_dir, cache_dir, kind, wait_compiled=args.wait_compiled and kind == "warm"
                )
                starts.append(result)
                print(f"run {run + 1} {kind}: {result.seconds_to_serving:.1f} s to SERVING", flush=True)
                for model, phases in result.models.items():
                    print(f"  {model}: {phases}", flush=True)
                if result.compiled_after:
                    print(f"  compiled in the background: {result.compiled_after}", flush=True)
    hardware = hardware_record()
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']}), {hardware['cores']} cores")
    print("| start | median s to SERVING | min | max |")
    print("|---|---|---|---|")
    for kind in ("cold", "warm"):
        seconds = [result.seconds_to_serving for result in starts if result.kind == kind]
        print(f"| {kind} | {statistics.median(seconds):.1f} | {min(seconds):.1f} | {max(seconds):.1f} |")
    args.out.write_text(json.dumps({"hardware": hardware, "starts": [asdict(s) for s in starts]}, indent=2))


if __name__ == "__main__":
    main()
