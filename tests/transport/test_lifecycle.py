"""Health transitions, reflection, and graceful shutdown of a real `rerank-sidecar` process."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.local_sidecar import free_port
from rerank.v1 import rerank_pb2, rerank_pb2_grpc
from sidecar import composition
from sidecar.server import SidecarServer, serve
from sidecar.settings import Settings
from sidecar.transport.grpc_api.server import RERANKER_SERVICE
from tests.conftest import RunningSidecar, docs, running_sidecar

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def test_health_is_not_serving_until_loaded_and_again_while_draining(tiny_bert: Path):
    async with running_sidecar(tiny_bert, load=False) as running:
        for service in ("", RERANKER_SERVICE):
            assert await health_of(running.channel, service) == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await running.stub.Rerank(rerank_pb2.RerankRequest(query="q", documents=docs("a")), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in raised.value.details()

        await running.server.load()
        for service in ("", RERANKER_SERVICE):
            assert await health_of(running.channel, service) == SERVING

        watch = health_pb2_grpc.HealthStub(running.channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(running.server.stop(grace=1.0))
        assert (await watch.read()).status == NOT_SERVING
        await stopping


async def test_reflection_lists_the_services(sidecar: RunningSidecar):
    stub = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=RERANKER_SERVICE)

    replies = [reply async for reply in stub.ServerReflectionInfo(requests(), timeout=10)]
    names = {service.name for service in replies[0].list_services_response.service}
    assert {RERANKER_SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize(
    ("taken", "says"),
    [
        ("port", "could not listen for gRPC on 127.0.0.1:{port}"),
        ("http_port", "could not listen for HTTP on 127.0.0.1:{port}"),
        ("metrics_port", "could not listen for metrics on 127.0.0.1:{port}: Address already in use"),
    ],
)
async def test_a_port_in_use_fails_start_up_in_one_line_and_stops_what_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, taken: str, says: str
):
    ports = {"port": 0, "http_port": free_port(), "metrics_port": 0}
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        settings = Settings(model=str(tmp_path / "unread"), host="127.0.0.1", **{**ports, taken: busy})
        assert await serve(settings) == 1
    (error,) = [
        record for record in caplog.records if record.levelname == "ERROR" and record.name == "sidecar.server"
    ]
    assert says.format(port=busy) in error.getMessage()
    if taken == "metrics_port":  # the HTTP transport it had started listens no more
        with socket.socket() as again:
            again.bind(("127.0.0.1", ports["http_port"]))


async def test_a_model_that_cannot_load_fails_start_up_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    missing = tmp_path / "no-such-model"
    settings = Settings(model=str(missing), host="127.0.0.1", port=0, metrics_port=0, cache_dir=str(tmp_path))
    assert await serve(settings) == 1
    logged = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert [record.levelname for record in logged] == ["ERROR"], [r.getMessage() for r in logged]
    assert f"Model {str(missing)!r}: no such directory" in logged[0].getMessage()


async def test_a_cache_that_cannot_be_written_anywhere_fails_start_up_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    def no_temporary_directory(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", "/tmp")

    blocking_file = tmp_path / "a-file"
    blocking_file.write_text("")
    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_directory)
    settings = Settings(
        model=str(tmp_path), host="127.0.0.1", port=0, metrics_port=0, cache_dir=str(blocking_file / "cache")
    )
    assert await serve(settings) == 1
    (error,) = [record for record in caplog.records if record.levelname == "ERROR"]
    assert "--cache-dir" in error.getMessage()
    assert "TMPDIR" in error.getMessage()


@pytest.mark.slow
async def test_sigterm_lets_the_call_in_flight_finish_and_exits_zero(tiny_bert: Path, tmp_path: Path):
    port = free_port()
    env = sidecar_env(tiny_bert, tmp_path, port)
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "--grace-period", "30", env=env, stderr=log_file
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_until_serving(channel, log_path)
            stub = rerank_pb2_grpc.RerankerStub(channel)
            long_text = " ".join(["word"] * 500)
            in_flight = stub.Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs(*[long_text] * 400, ids=[""] * 400)),
                timeout=120,
            )
            await asyncio.sleep(0.5)
            assert not in_flight.done(), "the request finished before the signal; make it longer"
            process.send_signal(signal.SIGTERM)
            response = await in_flight
            assert len(response.results) == 400
        exit_code = await asyncio.wait_for(process.wait(), timeout=60)
        log = log_path.read_text()
        assert exit_code == 0, log
        assert '"status": "OK"' in log
        assert "draining" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def wait_until_serving(channel: grpc.aio.Channel, log_path: Path) -> None:
    """Poll a sidecar process's health for up to a minute; fail with its log if it never serves."""
    for _ in range(600):
        try:
            if await health_of(channel, RERANKER_SERVICE) == SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"the sidecar never became SERVING:\n{await asyncio.to_thread(log_path.read_text)}")


def sidecar_env(model: Path, tmp_path: Path, port: int) -> dict[str, str]:
    """A torch fp32 sidecar on 127.0.0.1:port, compiling in the background (--torch-compile auto)."""
    return {
        **os.environ,
        "RERANK_MODEL": str(model),
        "RERANK_PORT": str(port),
        "RERANK_HOST": "127.0.0.1",
        "RERANK_ENGINE": "torch",
        "RERANK_PRECISION": "fp32",
        "RERANK_TORCH_COMPILE": "auto",
        "RERANK_EMBED_MODEL": "",
        "RERANK_METRICS_PORT": "0",
        "RERANK_CACHE_DIR": str(tmp_path / "cache"),
    }


async def test_sigterm_while_compiling_in_the_background_exits_zero_at_once(tiny_bert: Path, tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", env=sidecar_env(tiny_bert, tmp_path, port), stderr=log_file
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_until_serving(channel, log_path)
        process.send_signal(signal.SIGTERM)  # the first compile of a fresh cache takes seconds
        exit_code = await asyncio.wait_for(process.wait(), timeout=60)
        log = log_path.read_text()
        assert exit_code == 0, log
        assert "exiting without waiting for the background compile" in log
        assert "now serves compiled" not in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("variable", "ours", "operators"),
    [
        ("TOKENIZERS_PARALLELISM", "false", "true"),  # the Rust tokenizer's own thread pool
        ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64", "1024"),  # oneDNN's kernel cache
    ],
)
async def test_library_settings_are_the_sidecars_unless_the_operator_set_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, ours: str, operators: str
):
    settings = Settings(model=str(tmp_path), host="127.0.0.1", port=0)
    monkeypatch.delenv(variable, raising=False)
    await SidecarServer(settings).stop(grace=0)
    assert os.environ[variable] == ours
    monkeypatch.setenv(variable, operators)
    await SidecarServer(settings).stop(grace=0)
    assert os.environ[variable] == operators


@pytest.mark.parametrize(("operators", "calls"), [(None, [composition.MMAP_THRESHOLD]), ("131072", [])])
async def test_the_mmap_threshold_is_fixed_unless_the_operator_set_glibcs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operators: str | None, calls: list[int]
):
    fixed: list[int] = []
    monkeypatch.setattr(composition, "fix_mmap_threshold", fixed.append)
    if operators is None:
        monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", operators)
    await SidecarServer(Settings(model=str(tmp_path), host="127.0.0.1", port=0)).stop(grace=0)
    assert fixed == calls


async def test_a_cache_dir_that_cannot_be_written_serves_with_one_warning(tiny_bert: Path, tmp_path: Path):
    """Before, torch._dynamo created Inductor's cache in --cache-dir on import and the start failed,
    blaming the model's weights; now a temporary directory stands in, removed at exit."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # a directory under a regular file cannot be created, even by root
    port = free_port()
    env = {
        **sidecar_env(tiny_bert, tmp_path, port),
        "RERANK_CACHE_DIR": str(blocker / "cache"),
        "RERANK_TORCH_COMPILE": "off",
        "RERANK_LOG_FORMAT": "text",
    }
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    log_path = tmp_path / "sidecar.log"
    with log_path.open("w") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", env=env, stderr=log_file
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_until_serving(channel, log_path)
            response = await rerank_pb2_grpc.RerankerStub(channel).Rerank(
                rerank_pb2.RerankRequest(query="q", documents=docs("a", "b")), timeout=30
            )
            assert len(response.results) == 2
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(process.wait(), timeout=60)
        log = log_path.read_text()
        assert exit_code == 0, log
        assert log.count("cannot be written") == 1, log
        assert "nothing will be remembered" in log
        temporary = log.split("in the temporary directory ")[1].split()[0]
        assert not await asyncio.to_thread(Path(temporary).exists)  # removed at exit
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
