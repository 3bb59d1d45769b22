"""Stub wrappers for the sidecar: ``RerankClient`` (blocking) and ``AsyncRerankClient`` (asyncio).

Both build the same requests and return the same plain objects. Every call carries a deadline; the
channel retries UNAVAILABLE with backoff and spreads calls over every address the target resolves to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self, TypeVar

import grpc
import numpy as np

from client.errors import (
    DeadlineExceeded,
    SidecarError,
    SidecarRefused,
    SidecarUnreachable,
    UsageError,
    unreadable,
)
from rerank.v1 import rerank_pb2, rerank_pb2_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 4

Truncation = Literal["right", "left"]
LongDocuments = Literal["truncate", "chunk"]
DocumentLike = str | rerank_pb2.Document
T = TypeVar("T")


# ---- channel ----------------------------------------------------------------------------------------


def channel_target(target: str) -> str:
    """A gRPC target. A comma-separated list of ``ip:port`` becomes an ``ipv4:``/``ipv6:`` target, whose
    addresses round_robin balances over; anything else (``host:port``, ``dns:///name:port``) is kept."""
    addresses = [address.strip() for address in target.split(",") if address.strip()]
    if len(addresses) < 2:
        return target.strip()
    families = {_address_family(address) for address in addresses}
    if len(families) != 1 or None in families:
        raise UsageError(
            f"a list of sidecar addresses must all be IPv4 or all IPv6 literals with ports, got {target!r}; "
            "use a dns: target for host names"
        )
    return f"{families.pop()}:{','.join(addresses)}"


def _address_family(address: str) -> str | None:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return "ipv4" if ip.version == 4 else "ipv6"


def service_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> str:
    """round_robin over every resolved address, and retries of the statuses a replica that is starting or
    stopping answers: UNAVAILABLE while it loads or drains, and CANCELLED for a call that reaches it in
    the instant its listener closes. Every sidecar method is idempotent, so a retry is always safe; a
    call the caller itself cancels is never retried. One attempt means no retry policy at all (gRPC
    refuses a policy of fewer than two attempts)."""
    services = [{"service": service.full_name} for service in rerank_pb2.DESCRIPTOR.services_by_name.values()]
    method_config: dict[str, Any] = {"name": services}
    if max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
        }
    config = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method_config]}
    return json.dumps(config)


@dataclass(frozen=True)
class TlsConfig:
    """Server verification with ``root_certs`` (PEM); ``client_cert`` and ``client_key`` add mutual TLS."""

    root_certs: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise UsageError(
                "a TLS client certificate needs its key, and a key its certificate: set both "
                "--tls-client-cert and --tls-client-key"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.root_certs, "the TLS root certificates file"),
            private_key=_read_pem(self.client_key, "the TLS client key file"),
            certificate_chain=_read_pem(self.client_cert, "the TLS client certificate file"),
        )


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise unreadable(path, what, exc) from exc


_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(target: str) -> bool:
    """Whether every address of a target is on this machine (a loopback address, or a unix socket)."""
    target = target.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    addresses = [address.strip() for address in target.split(",") if address.strip()]
    return bool(addresses) and all(_loopback_address(address) for address in addresses)


def _loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def channel_credentials(
    target: str, tls: TlsConfig | None, token: str, allow_insecure_token: bool
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...] | None]:
    """The channel's credentials (None: plaintext) and the metadata every call adds.

    A token rides as call credentials, which gRPC sends only over TLS or to this machine (local
    credentials: plaintext, but the connection never leaves the host). A token over plaintext to another
    host could be read on the wire, so it needs ``allow_insecure_token``, and then goes as plain metadata.
    """
    if tls is not None:
        credentials = tls.credentials()
        if token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(token)
            )
        return credentials, None
    if not token:
        return None, None
    if is_loopback(target):
        connection = (
            grpc.LocalConnectionType.UDS if target.startswith("unix") else grpc.LocalConnectionType.LOCAL_TCP
        )
        local = grpc.local_channel_credentials(connection)
        return grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(token)), None
    if not allow_insecure_token:
        raise UsageError(
            f"a token is set, but the sidecar at {target} is reached over plaintext, where the token "
            "could be read on the network: use TLS (--tls-root-certs), or reach the sidecar on a loopback "
            "address, or set --allow-insecure-token if the network is trusted"
        )
    return None, (("authorization", f"Bearer {token}"),)


def channel_options(max_attempts: int) -> list[tuple[str, str | int]]:
    return [
        ("grpc.service_config", service_config(max_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


# ---- requests and results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RerankOptions:
    """The request options of ``Rerank`` and ``RerankStream``; see the README's table of fields."""

    top_n: int = 0
    raw_scores: bool = False
    max_length: int = 0
    truncation: Truncation = "right"
    long_documents: LongDocuments = "truncate"
    max_chunks_per_doc: int = 0
    chunk_overlap: int = 0
    return_text: bool = False

    def fields(self) -> dict[str, object]:
        return {
            "top_n": self.top_n,
            "raw_scores": self.raw_scores,
            "max_length": self.max_length,
            "truncation_direction": _TRUNCATION[self.truncation],
            "long_documents": _LONG_DOCUMENTS[self.long_documents],
            "max_chunks_per_doc": self.max_chunks_per_doc,
            "chunk_overlap": self.chunk_overlap,
            "return_text": self.return_text,
        }


_TRUNCATION = {
    "right": rerank_pb2.TRUNCATION_DIRECTION_RIGHT,
    "left": rerank_pb2.TRUNCATION_DIRECTION_LEFT,
}
_LONG_DOCUMENTS = {
    "truncate": rerank_pb2.LONG_DOCUMENTS_TRUNCATE,
    "chunk": rerank_pb2.LONG_DOCUMENTS_CHUNK,
}


@dataclass(frozen=True)
class ScoredDocument:
    index: int  # position in the request (in a stream: across all batches)
    id: str
    score: float
    text: str | None = None


@dataclass(frozen=True)
class Usage:
    pairs: int
    chunks: int
    tokens: int
    batches: int
    queue_ms: float
    tokenization_ms: float
    inference_ms: float
    total_ms: float
    # Of the pairs, those the sidecar's score cache answered (the rest ran through the model).
    cached_pairs: int = 0


@dataclass(frozen=True)
class Ranking:
    """A whole ranking: the answer of ``Rerank``, and the last item of ``rerank_stream``."""

    results: list[ScoredDocument]
    usage: Usage
    model_id: str


@dataclass(frozen=True)
class BatchScores:
    """The scores of one streamed batch, in the order it was sent."""

    batch: int
    results: list[ScoredDocument]


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # float32, one row per text, in request order
    model_id: str
    usage: Usage

    @property
    def dims(self) -> int:
        return int(self.vectors.shape[1])


def _documents(documents: Sequence[DocumentLike]) -> list[rerank_pb2.Document]:
    return [
        document if isinstance(document, rerank_pb2.Document) else rerank_pb2.Document(text=document)
        for document in documents
    ]


def rerank_request(
    query: str, documents: Sequence[DocumentLike], options: RerankOptions
) -> rerank_pb2.RerankRequest:
    return rerank_pb2.RerankRequest(query=query, documents=_documents(documents), **options.fields())


def stream_request(
    query: str, batch: Sequence[DocumentLike], options: RerankOptions, *, first: bool
) -> rerank_pb2.RerankStreamRequest:
    """The first message carries the query and options; later ones only documents (the contract's rule)."""
    if first:
        return rerank_pb2.RerankStreamRequest(query=query, documents=_documents(batch), **options.fields())
    return rerank_pb2.RerankStreamRequest(documents=_documents(batch))


def embed_request(texts: Sequence[str], max_length: int, truncation: Truncation) -> rerank_pb2.EmbedRequest:
    return rerank_pb2.EmbedRequest(
        texts=texts, max_length=max_length, truncation_direction=_TRUNCATION[truncation]
    )


def _results(results: Iterable[rerank_pb2.Result]) -> list[ScoredDocument]:
    return [ScoredDocument(r.index, r.id, r.score, r.text if r.HasField("text") else None) for r in results]


def _usage(usage: rerank_pb2.Usage) -> Usage:
    return Usage(
        pairs=usage.pairs,
        chunks=usage.chunks,
        tokens=usage.tokens,
        batches=usage.batches,
        queue_ms=usage.queue_ns / 1e6,
        tokenization_ms=usage.tokenization_ns / 1e6,
        inference_ms=usage.inference_ns / 1e6,
        total_ms=usage.total_ns / 1e6,
        cached_pairs=usage.cached_pairs,
    )


def ranking_from(message: rerank_pb2.RerankResponse | rerank_pb2.FinalRanking) -> Ranking:
    return Ranking(_results(message.results), _usage(message.usage), message.model_id)


def stream_item(message: rerank_pb2.RerankStreamResponse) -> BatchScores | Ranking:
    if message.WhichOneof("kind") == "batch_scores":
        return BatchScores(message.batch_scores.batch, _results(message.batch_scores.results))
    return ranking_from(message.final)


def embeddings_from(message: rerank_pb2.EmbedResponse) -> Embeddings:
    vectors = np.array([embedding.values for embedding in message.embeddings], dtype=np.float32)
    vectors = vectors.reshape(len(message.embeddings), message.dims)
    return Embeddings(vectors, message.model_id, _usage(message.usage))


class _CallerBatches:
    """The caller's batches as the stream's requests. An exception they raise (or a batch that is not
    documents) ends the stream and is kept here, for the client to raise in place of any answer: raised into
    gRPC, it would come back as the sidecar's failure (UNKNOWN, "Exception iterating requests!") from the
    blocking client, or as a bare CancelledError from the asyncio one."""

    def __init__(self, query: str, options: RerankOptions) -> None:
        self._query = query
        self._options = options
        self._error: Exception | None = None

    def requests(self, batches: Iterable[Sequence[DocumentLike]]) -> Iterator[rerank_pb2.RerankStreamRequest]:
        try:
            for number, batch in enumerate(batches):
                yield stream_request(self._query, batch, self._options, first=number == 0)
        except Exception as exc:
            self._error = exc

    async def async_requests(
        self, batches: Iterable[Sequence[DocumentLike]] | AsyncIterable[Sequence[DocumentLike]]
    ) -> AsyncIterator[rerank_pb2.RerankStreamRequest]:
        number = 0
        try:
            async for batch in _aiter(batches):
                yield stream_request(self._query, batch, self._options, first=number == 0)
                number += 1
        except Exception as exc:
            self._error = exc

    def raise_error(self) -> None:
        """Raises the exception the batches raised, if any: no answer to a stream cut short counts."""
        if self._error is not None:
            raise self._error from None  # the call's own failure followed from it


# ---- errors -----------------------------------------------------------------------------------------


def sidecar_error(
    exc: grpc.RpcError, target: str, method: str, timeout: float, *, tls: bool = False
) -> SidecarError:
    """The ``SidecarError`` for a failed call, its message saying what to do about the status.

    A refused TLS handshake reaches the client as UNAVAILABLE, often as a bare "Socket closed" (under
    TLS 1.3 the server rejects a client certificate after the client's side is done), so over TLS an
    unavailable sidecar's message names the TLS settings too."""
    code = exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None) or str(exc)
    status = f"{code.name}: {details}"
    where = f"the sidecar at {target}"
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"{where} is unavailable ({status}): start it, or set --target to where it runs"
        if tls:
            message += (
                "; or the TLS handshake failed: --tls-root-certs must hold the CA that signed the sidecar's "
                "certificate, and a sidecar that requires client certificates (mutual TLS) needs "
                "--tls-client-cert and --tls-client-key, signed by its client CA"
            )
        return SidecarUnreachable(message, code, details)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        message = (
            f"{where} refused {method} ({status}): set --token (RERANK_CLIENT_TOKEN) to the token the "
            "sidecar was started with (its --auth-token)"
        )
        return SidecarRefused(message, code, details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = (
            f"{where} did not answer {method} within the {timeout:g} s deadline ({code.name}): raise "
            "--timeout, or send fewer texts or candidates per call (--embed-batch-size, --candidates)"
        )
        return DeadlineExceeded(message, code, details)
    if code == grpc.StatusCode.UNIMPLEMENTED and method == "Embed":
        message = f"{where} serves no embedding model ({status}): start it with --embed-model"
        return SidecarError(message, code, details)
    return SidecarError(f"{where} failed {method} ({status})", code, details)


# ---- clients ----------------------------------------------------------------------------------------


class _ClientBase:
    # ``grpc`` for the blocking client, ``grpc.aio`` for the asyncio one: the same channel factories.
    _grpc: ClassVar[Any]
    _opens_on_first_use: ClassVar[bool] = False

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls: TlsConfig | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        token: str = "",
        allow_insecure_token: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.target = channel_target(target)
        self.timeout = timeout
        self._tls = tls
        self._options = channel_options(max_attempts)
        self._credentials, self._metadata = channel_credentials(self.target, tls, token, allow_insecure_token)
        if not self._opens_on_first_use:
            self._open_channel()

    def _open_channel(self) -> None:
        if self._credentials is None:
            self._channel = self._grpc.insecure_channel(self.target, options=self._options)
        else:
            self._channel = self._grpc.secure_channel(self.target, self._credentials, options=self._options)
        self._reranker = rerank_pb2_grpc.RerankerStub(self._channel)
        self._embedder = rerank_pb2_grpc.EmbedderStub(self._channel)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    @contextmanager
    def _errors(self, method: str, timeout: float) -> Iterator[None]:
        """gRPC errors of ``method`` become ``SidecarError``s, which say what to fix."""
        try:
            yield
        except grpc.RpcError as exc:
            raise sidecar_error(exc, self.target, method, timeout, tls=self._tls is not None) from exc


class RerankClient(_ClientBase):
    """Blocking client. ``with RerankClient("127.0.0.1:50051") as client: client.rerank(...)``."""

    _grpc = grpc

    def rerank(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        options: RerankOptions = RerankOptions(),  # frozen, so sharing the default is safe
        *,
        timeout: float | None = None,
    ) -> Ranking:
        request, deadline = rerank_request(query, documents, options), self._deadline(timeout)
        with self._errors("Rerank", deadline):
            return ranking_from(self._reranker.Rerank(request, timeout=deadline, metadata=self._metadata))

    def rerank_stream(
        self,
        query: str,
        batches: Iterable[Sequence[DocumentLike]],
        options: RerankOptions = RerankOptions(),
        *,
        timeout: float | None = None,
    ) -> Iterator[BatchScores | Ranking]:
        """Streams ``batches`` (consumed lazily, on gRPC's sending thread) and yields each batch's scores as
        they come back, then the final ``Ranking`` last. An exception ``batches`` raise is raised here.
        Leaving the loop early cancels the call."""
        caller = _CallerBatches(query, options)
        deadline = self._deadline(timeout)
        call = self._reranker.RerankStream(
            caller.requests(batches), timeout=deadline, metadata=self._metadata
        )
        try:
            with self._errors("RerankStream", deadline):
                for message in call:
                    caller.raise_error()
                    yield stream_item(message)
            caller.raise_error()
        except SidecarError:
            caller.raise_error()
            raise
        finally:
            call.cancel()  # a no-op once the call has finished

    def embed(
        self,
        texts: Sequence[str],
        *,
        max_length: int = 0,
        truncation: Truncation = "right",
        timeout: float | None = None,
    ) -> Embeddings:
        request, deadline = embed_request(texts, max_length, truncation), self._deadline(timeout)
        with self._errors("Embed", deadline):
            return embeddings_from(self._embedder.Embed(request, timeout=deadline, metadata=self._metadata))

    def info(self, *, timeout: float | None = None) -> rerank_pb2.InfoResponse:
        deadline = self._deadline(timeout)
        with self._errors("Info", deadline):
            return self._reranker.Info(rerank_pb2.InfoRequest(), timeout=deadline, metadata=self._metadata)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncRerankClient(_ClientBase):
    """asyncio client: ``async with AsyncRerankClient(target) as client: await client.rerank(...)``.

    ``timeout`` is the gRPC deadline of the call in seconds, as in grpc-python's own stubs.
    """

    _grpc = grpc.aio
    _opens_on_first_use = True
    _loop: asyncio.AbstractEventLoop | None = None
    _closed = False

    def _stubs(self) -> tuple[rerank_pb2_grpc.RerankerStub, rerank_pb2_grpc.EmbedderStub]:
        """The stubs, on a channel made on first use: a grpc.aio channel works only in the event loop it
        was made in, so a client made at import time, before any loop runs, still works in the app's."""
        loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError(f"this AsyncRerankClient ({self.target}) is closed; make a new one")
        if self._loop is None:
            self._open_channel()
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError(
                f"this AsyncRerankClient ({self.target}) was first used in another event loop, and a gRPC "
                "channel serves one; make one client per event loop"
            )
        return self._reranker, self._embedder

    async def rerank(
        self,
        query: str,
        documents: Sequence[DocumentLike],
        options: RerankOptions = RerankOptions(),
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Ranking:
        request, deadline = rerank_request(query, documents, options), self._deadline(timeout)
        with self._errors("Rerank", deadline):
            call = self._stubs()[0].Rerank(request, timeout=deadline, metadata=self._metadata)
            return ranking_from(await call)

    async def rerank_stream(
        self,
        query: str,
        batches: Iterable[Sequence[DocumentLike]] | AsyncIterable[Sequence[DocumentLike]],
        options: RerankOptions = RerankOptions(),
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[BatchScores | Ranking]:
        """Streams ``batches`` as they are produced and yields each batch's scores as they come back, then the
        final ``Ranking`` last. An exception ``batches`` raise is raised here. Leaving the loop early cancels
        the call."""
        caller = _CallerBatches(query, options)
        deadline = self._deadline(timeout)
        call = self._stubs()[0].RerankStream(
            caller.async_requests(batches), timeout=deadline, metadata=self._metadata
        )
        try:
            with self._errors("RerankStream", deadline):
                async for message in call:
                    caller.raise_error()
                    yield stream_item(message)
            caller.raise_error()
        except SidecarError:
            caller.raise_error()
            raise
        finally:
            call.cancel()  # a no-op once the call has finished

    async def embed(
        self,
        texts: Sequence[str],
        *,
        max_length: int = 0,
        truncation: Truncation = "right",
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Embeddings:
        request, deadline = embed_request(texts, max_length, truncation), self._deadline(timeout)
        with self._errors("Embed", deadline):
            call = self._stubs()[1].Embed(request, timeout=deadline, metadata=self._metadata)
            return embeddings_from(await call)

    async def info(self, *, timeout: float | None = None) -> rerank_pb2.InfoResponse:  # noqa: ASYNC109
        deadline = self._deadline(timeout)
        with self._errors("Info", deadline):
            call = self._stubs()[0].Info(rerank_pb2.InfoRequest(), timeout=deadline, metadata=self._metadata)
            return await call

    async def close(self) -> None:
        self._closed = True
        if self._loop is not None:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
