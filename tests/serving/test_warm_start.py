"""A warm start from a filled cache serves a compiled engine without torch or transformers; whatever in
the cache or the model directory no longer holds sends the start through the full load, logged with
the reason."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import ModelLoadError
from sidecar.model.loading import ModelSource
from sidecar.model.phases import PhaseTimer
from sidecar.model.warm import differing_files, model_files
from sidecar.serving import runtime as runtime_module
from sidecar.serving.runtime import Runtime, load_runtime
from sidecar.settings import Settings
from tests.conditions import needs_openvino_int8
from tests.model.test_selection import fail_to_load
from tests.models import save_tiny_bert

REPO = Path(__file__).resolve().parents[2]
COMPILED_ENGINES = ("onnxruntime", "openvino")


def settings_for(model_dir: Path, cache_dir: Path, engine: str) -> Settings:
    return Settings(
        model=str(model_dir),
        cache_dir=str(cache_dir),
        engine=engine,
        precision="fp32",
        embed_model="",
        batch_workers=1,
        torch_compile="off",
        # Selection in this process, whose log lines the tests read; a first start's child process is
        # tested through a server subprocess below.
        select_in_subprocess=False,
    )


def start(model_dir: Path, cache_dir: Path, engine: str) -> Runtime:
    return load_runtime(settings_for(model_dir, cache_dir, engine), ModelSource(str(model_dir)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("warm") / "bert")


@pytest.fixture(scope="module")
def filled_caches(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cache per compiled engine, filled by a cold start."""
    caches = {}
    for engine in COMPILED_ENGINES:
        caches[engine] = tmp_path_factory.mktemp(f"cache-{engine}")
        runtime = start(model_dir, caches[engine], engine)
        assert not runtime.selection.from_cache
        runtime.engine.close()
    return caches


@pytest.fixture
def cache_copy(filled_caches: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """The filled caches, copied, so a test may damage its own."""
    return {
        engine: Path(shutil.copytree(cache, tmp_path / engine)) for engine, cache in filled_caches.items()
    }


_WARM_START = textwrap.dedent(
    """
    import asyncio, json, sys

    from sidecar.logs import configure_logging
    from sidecar.settings import Settings

    settings = Settings(**json.loads(sys.argv[1]))
    configure_logging(settings)  # before grpc and the model libraries load, as rerank-sidecar does

    import grpc

    from rerank.v1 import rerank_pb2, rerank_pb2_grpc
    from sidecar.server import SidecarServer

    async def main() -> None:
        server = SidecarServer(settings)
        await server.start()
        await server.load()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rerank_pb2_grpc.RerankerStub(channel)
            documents = [rerank_pb2.Document(text=text) for text in ("a cat sat", "the stock market")]
            reply = await stub.Rerank(rerank_pb2.RerankRequest(query="where is the cat", documents=documents))
            info = await stub.Info(rerank_pb2.InfoRequest())
        await server.stop(grace=1.0)
        print(json.dumps({
            "engine": info.engine,
            "from_cache": info.selection.from_cache,
            "scores": [result.score for result in reply.results],
            "imported": sorted(name for name in ("torch", "transformers") if name in sys.modules),
        }))

    asyncio.run(main())
    """
)


def serve_in_a_fresh_process(
    model: Path | str, cache_dir: Path, engine: str, precision: str = "fp32"
) -> dict[str, Any]:
    """Start a server in a fresh interpreter, rerank once, and say what it served and imported, and
    what it logged."""
    options = {
        "model": str(model),
        "cache_dir": str(cache_dir),
        "engine": engine,
        "precision": precision,
        "embed_model": "",
        "batch_workers": 1,
        "torch_compile": "off",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
    }
    finished = subprocess.run(
        [sys.executable, "-c", _WARM_START, json.dumps(options)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr
    served: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    assert served["engine"] == engine
    assert served["imported"] == []
    assert len(served["scores"]) == 2
    return served | {"log": finished.stderr}


@pytest.mark.parametrize("engine", COMPILED_ENGINES)
def test_a_warm_start_serves_without_importing_torch(
    engine: str, model_dir: Path, filled_caches: dict[str, Path]
) -> None:
    assert serve_in_a_fresh_process(model_dir, filled_caches[engine], engine)["from_cache"]


def test_a_first_start_selects_in_a_child_process_and_serves_without_torch(
    model_dir: Path, tmp_path: Path
) -> None:
    served = serve_in_a_fresh_process(model_dir, tmp_path / "empty-cache", "openvino")
    assert not served["from_cache"]  # this start chose it, in its child
    assert "remembered choice" not in served["log"]  # the log says what this start did
    for line in served["log"].splitlines():  # the export's warnings and loading bars included
        assert isinstance(json.loads(line), dict), line
    assert "(remembered" not in served["log"]


@needs_openvino_int8  # OpenVINO builds more than one candidate, so some are left unread
def test_a_first_start_keeps_only_the_artifacts_a_warm_start_reads(model_dir: Path, tmp_path: Path) -> None:
    # OpenVINO under precision auto builds static int8 and fp32 (and bf16 where the CPU has it): one serves.
    cache = tmp_path / "cache"
    first = serve_in_a_fresh_process(model_dir, cache, "openvino", precision="auto")
    removed = re.search(r"removed (\d+) cached artifacts \(\d+ MB\) .*: (\S.*)$", first["log"], re.MULTILINE)
    assert removed is not None, first["log"]
    removed_names = set(removed[2].split(", "))
    assert len(removed_names) == int(removed[1]) >= 1
    left = {entry.name for entry in cache.iterdir() if (entry / "manifest.json").is_file()}
    assert not left & removed_names

    again = serve_in_a_fresh_process(model_dir, cache, "openvino", precision="auto")
    assert again["from_cache"]
    assert "removed" not in again["log"]  # nothing was built
    read = set(re.findall(r"reusing cached \S+ \S*/([^/\s]+)/[^/\s]+$", again["log"], re.MULTILINE))
    assert read == left


def test_the_models_of_a_first_start_share_one_selection_process(
    tiny_bert: Path, tiny_bert_two_labels: Path, tmp_path: Path
) -> None:
    served = serve_in_a_fresh_process(f"one={tiny_bert},two={tiny_bert_two_labels}", tmp_path, "openvino")
    children = re.findall(r"selecting the engine for (\S+) in child process (\d+)", served["log"])
    assert [model for model, _ in children] == [tiny_bert.name, tiny_bert_two_labels.name]
    assert len({pid for _, pid in children}) == 1


def _selects_for_ever(settings: Settings, requests: Connection) -> None:
    """A selection child that takes a model and never answers; it says it started in the cache dir."""
    requests.recv()
    (Path(settings.cache_dir) / "selecting").touch()
    time.sleep(600)


def test_closing_stops_a_selection_in_the_middle_and_its_load_fails_at_once(model_dir: Path, tmp_path: Path):
    process = runtime_module.SelectionProcess(work=_selects_for_ever)
    settings = settings_for(model_dir, tmp_path, "openvino")
    failures: list[str] = []

    def select() -> None:
        try:
            process.select(settings, ModelSource(str(model_dir)), tmp_path, PhaseTimer())
        except ModelLoadError as exc:
            failures.append(str(exc))

    selecting = threading.Thread(target=select)
    selecting.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "selecting").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "selecting").exists()
    closed = time.monotonic()
    process.close()
    selecting.join(30)
    assert not selecting.is_alive()
    assert time.monotonic() - closed < 10  # the child is stopped, not waited for
    assert failures == [f"the start stopped while the engine for {model_dir.name} was selected"]


def _openvino_blob(cache: Path) -> Path:
    (blob,) = cache.glob("openvino-*/model.blob")
    return blob


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _stale_manifest(path: Path) -> None:
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["key"]["openvino"] = "2020.1.0"  # written by another OpenVINO
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (Path.unlink, "the artifact file is missing"),
        (_truncate, "checksum does not match"),
        (_stale_manifest, "its key differs"),
    ],
    ids=["missing", "truncated", "other-version"],
)
def test_a_damaged_artifact_sends_the_start_through_the_full_load(
    damage, reason: str, model_dir: Path, cache_copy: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cache = cache_copy["openvino"]
    blob = _openvino_blob(cache)
    damage(blob)
    with caplog.at_level(logging.INFO):
        runtime = start(model_dir, cache, "openvino")
    fallback = [r.getMessage() for r in caplog.records if "in full, as on a first start" in r.getMessage()]
    assert len(fallback) == 1
    assert str(blob) in fallback[0]
    assert reason in fallback[0]
    # The full load rebuilt the blob, so the remembered engine serves, and the next start is warm again.
    assert runtime.engine.name == "openvino"
    assert runtime.selection.from_cache
    runtime.engine.close()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        start(model_dir, cache, "openvino").engine.close()
    assert "(its cached verdict and artifacts)" in caplog.text


def test_a_verdict_of_another_library_version_selects_afresh(
    model_dir: Path, cache_copy: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cache = cache_copy["onnxruntime"]
    (verdict_path,) = (cache / "verdicts").glob("*.json")
    verdict = json.loads(verdict_path.read_text())
    verdict["key"]["onnxruntime"] = "1.0.0"
    verdict_path.write_text(json.dumps(verdict))
    with caplog.at_level(logging.INFO):
        runtime = start(model_dir, cache, "onnxruntime")
    assert "onnxruntime '1.0.0' -> " in caplog.text
    assert "selecting an engine afresh" in caplog.text
    assert not runtime.selection.from_cache
    runtime.engine.close()


def test_a_deleted_tokenizer_file_is_reported_with_its_path(
    model_dir: Path, cache_copy: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The record is per model directory: the copy is cold-started on the same cache, then damaged.
    copied = Path(shutil.copytree(model_dir, tmp_path / "model"))
    cache = cache_copy["openvino"]
    start(copied, cache, "openvino").engine.close()
    (copied / "tokenizer.json").unlink()
    # The warm start says which file went; the full load then refuses a tokenizer with no vocabulary.
    with caplog.at_level(logging.INFO), pytest.raises(ModelLoadError, match="no vocabulary") as raised:
        start(copied, cache, "openvino")
    assert f"missing: {copied / 'tokenizer.json'}" in caplog.text
    assert str(copied / "tokenizer.json") in str(raised.value)


def test_a_deleted_cached_tokenizer_is_reported_and_rebuilt(
    model_dir: Path, cache_copy: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cache = cache_copy["onnxruntime"]
    (cached,) = cache.glob("tokenizer-*/tokenizer.json")
    cached.unlink()
    with caplog.at_level(logging.INFO):
        runtime = start(model_dir, cache, "onnxruntime")
    assert f"the cached tokenizer {cached} is unusable" in caplog.text
    assert runtime.selection.from_cache
    runtime.engine.close()
    assert cached.is_file()


def test_the_torch_engine_loads_in_full(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        runtime = start(model_dir, tmp_path, "torch")
    assert "in full: --engine torch" in caplog.text
    assert runtime.engine.name == "torch"
    assert not (tmp_path / "warm").exists()


def test_model_files_names_what_changed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("")
    before = model_files(tmp_path)
    assert set(before) == {"config.json", "tokenizer.json"}
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").write_text("a")
    described = differing_files(tmp_path, before, model_files(tmp_path))
    assert f"missing: {tmp_path / 'tokenizer.json'}" in described
    assert f"changed: {tmp_path / 'config.json'}" in described
    assert f"added: {tmp_path / 'vocab.txt'}" in described


def test_model_files_changed_while_a_start_loads_them_are_not_remembered(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine was built from the files as read; a record with the files as they are after would
    # serve that engine for other files on every later start.
    changing = Path(shutil.copytree(model_dir, tmp_path / "model"))
    original_load = runtime_module.load_model

    def load_then_replace_the_config(*args: Any, **kwargs: Any) -> Any:
        loaded = original_load(*args, **kwargs)
        (changing / "config.json").write_text((changing / "config.json").read_text() + "\n")
        return loaded

    monkeypatch.setattr(runtime_module, "load_model", load_then_replace_the_config)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING):
        start(changing, cache, "onnxruntime").engine.close()
    assert not list((cache / "warm").glob("*.json"))
    assert f"changed: {changing / 'config.json'}" in caplog.text
    monkeypatch.undo()
    with caplog.at_level(logging.INFO):
        again = start(changing, cache, "onnxruntime")  # loads in full, and remembers this time
    assert "nothing is remembered for the model" in caplog.text
    again.engine.close()
    assert list((cache / "warm").glob("*.json"))


def test_a_torch_verdict_leaves_no_record_for_warm_starts(
    model_dir: Path, cache_copy: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cache = cache_copy["openvino"]
    assert list((cache / "warm").glob("*.json"))
    start(model_dir, cache, "torch")  # the model now served by torch: the warm record goes stale
    assert not list((cache / "warm").glob("*.json"))


def test_a_warm_engine_is_gated_against_the_remembered_scores(
    model_dir: Path, cache_copy: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cache = cache_copy["onnxruntime"]
    (verdict_path,) = (cache / "verdicts").glob("*.json")
    verdict = json.loads(verdict_path.read_text())
    scores = verdict["verdict"]["reference_scores"]
    verdict["verdict"]["reference_scores"] = scores[::-1]  # scores the engine cannot match
    verdict_path.write_text(json.dumps(verdict))
    with caplog.at_level(logging.INFO):
        runtime = start(model_dir, cache, "onnxruntime")
    fallback = [r.getMessage() for r in caplog.records if "in full, as on a first start" in r.getMessage()]
    assert len(fallback) == 1
    assert "failed the parity gate" in fallback[0]
    assert not runtime.selection.from_cache  # the full load selected afresh, against torch itself
    runtime.engine.close()


def test_a_model_torch_serves_loads_in_full_at_once_on_the_next_start(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fail_to_load(monkeypatch)  # so torch wins the selection
    first = dataclasses.replace(settings_for(model_dir, tmp_path, "auto"), select_in_subprocess=True)
    runtime = load_runtime(
        dataclasses.replace(first, select_in_subprocess=False), ModelSource(str(model_dir))
    )
    assert runtime.engine.name == "torch"
    runtime.engine.close()

    def no_child(*args: object) -> None:
        raise AssertionError("a model torch serves needs no selection in a child process")

    monkeypatch.setattr(runtime_module.SelectionProcess, "select", no_child)
    with caplog.at_level(logging.INFO):
        again = load_runtime(first, ModelSource(str(model_dir)))
    assert again.engine.name == "torch"
    assert again.selection.from_cache  # the verdict, remembered
    assert "the remembered engine runs the PyTorch network: torch/fp32" in caplog.text
    again.engine.close()


def test_a_model_torch_served_selects_in_the_child_when_another_engine_is_asked_for(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with monkeypatch.context() as patched:
        fail_to_load(patched)  # so torch wins the selection
        load_runtime(settings_for(model_dir, tmp_path, "auto"), ModelSource(str(model_dir))).engine.close()
    children: list[str] = []

    def child_selects(self: object, settings: Settings, *args: object) -> None:
        children.append(settings.engine)  # and chooses nothing: this process then selects in full

    monkeypatch.setattr(runtime_module.SelectionProcess, "select", child_selects)
    asked = dataclasses.replace(settings_for(model_dir, tmp_path, "onnxruntime"), select_in_subprocess=True)
    with caplog.at_level(logging.INFO):
        runtime = load_runtime(asked, ModelSource(str(model_dir)))
    assert runtime.engine.name == "onnxruntime"
    runtime.engine.close()
    assert children == ["onnxruntime"]
    assert "--engine onnxruntime asks for another" in caplog.text


async def test_a_start_removes_the_artifacts_no_start_used_within_the_retention_once_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.conftest import running_sidecar

    model = save_tiny_bert(tmp_path / "model")
    cache_dir = tmp_path / "cache"
    stale = cache_dir / f"openvino-{'0' * 24}"  # a blob of a library version no longer installed
    stale.mkdir(parents=True)
    (stale / "model.blob").write_bytes(b"x" * 1000)
    (stale / "manifest.json").write_text("{}")
    long_ago = time.time() - 31 * 86400
    os.utime(stale / "manifest.json", (long_ago, long_ago))
    recent = cache_dir / f"openvino-{'1' * 24}"  # used by another start on the same volume, 29 days ago
    shutil.copytree(stale, recent)
    not_so_long_ago = time.time() - 29 * 86400
    os.utime(recent / "manifest.json", (not_so_long_ago, not_so_long_ago))
    with caplog.at_level(logging.INFO, logger="sidecar.serving.runtime"):
        async with running_sidecar(model, cache_dir=str(cache_dir), cache_retention_days=30) as running:
            assert running.server.core.ranking is not None  # serving
            assert not stale.exists()
            assert recent.exists()
    assert "removed 1 cached artifacts (0 MB) that no start had used for 30 days" in caplog.text
    assert stale.name in caplog.text
