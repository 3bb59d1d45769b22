"""What every transport does around a call: check its bearer token, count it in flight, log it, and record
it in the metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sidecar.errors import Unauthenticated
from sidecar.serving.core import ServingCore
from sidecar.serving.embedding import Embedder
from sidecar.serving.metrics import Metrics
from sidecar.serving.reranking import Reranker
from sidecar.serving.usage import Usage

logger = logging.getLogger("sidecar.access")

REQUEST_ID_KEY = "x-request-id"


@dataclass
class CallRecord:
    """What a handler reports about its call, for the access log line."""

    method: str
    request_id: str
    model: str = ""  # the served model's name, once the handler has chosen it
    usage: Usage | None = None
    deadline: float | None = None  # time.monotonic() seconds, for transports that carry one in a header


current_call: ContextVar[CallRecord] = ContextVar("current_call")


class BearerToken:
    """The token every call must bring (--auth-token), compared in constant time. ``send_as`` and
    ``carrier`` say how the transport carries it, for the refusal's message."""

    def __init__(self, token: str, *, send_as: str, carrier: str) -> None:
        self._expected = token.encode()
        self._send_as = send_as
        self._carrier = carrier

    def check(self, supplied: str | bytes) -> None:
        """Raise Unauthenticated unless ``supplied`` is ``Bearer <token>``; the scheme's case is free
        (RFC 7235)."""
        supplied_bytes = supplied.encode() if isinstance(supplied, str) else bytes(supplied)
        if not supplied_bytes:
            raise Unauthenticated(f"missing bearer token: send {self._send_as}")
        scheme, _, token = supplied_bytes.partition(b" ")
        if scheme.lower() != b"bearer":
            # Only a known scheme is named: a bare token sent without "Bearer " must not come back in an
            # error that clients and proxies print.
            known = scheme.decode(errors="replace").lower() in _KNOWN_SCHEMES
            named = f"the scheme {scheme.decode()!r}" if known else "no known scheme"
            raise Unauthenticated(f"the {self._carrier} uses {named}, not Bearer: send {self._send_as}")
        if not hmac.compare_digest(token.strip(b" "), self._expected):
            raise Unauthenticated(f"the bearer token in the {self._carrier} is not valid")


# The IANA HTTP authentication schemes, and those API-key clients commonly send.
_KNOWN_SCHEMES = frozenset(
    {"basic", "digest", "hoba", "mutual", "negotiate", "ntlm", "oauth", "scram-sha-1", "scram-sha-256"}
    | {"vapid", "token", "apikey", "api-key", "key"}
)


class CallLedger:
    """The calls of one transport: how many are in flight, and a log line and metrics for each."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def idle(self) -> None:
        """Return once no call is in flight."""
        await self._idle.wait()

    def begin(self, method: str, request_id: str) -> CallRecord:
        """Start a call; the record is this context's ``current_call`` from now on."""
        record = CallRecord(method, request_id)
        current_call.set(record)
        self.in_flight += 1
        self._idle.clear()
        return record

    def finish(self, record: CallRecord, status: str, started_ns: int) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
        duration_s = (time.monotonic_ns() - started_ns) / 1e9
        _log_call(record, status, duration_s)
        self._metrics.record_call(record.method, record.model, status, record.usage, duration_s)


def _log_call(record: CallRecord, status: str, duration_s: float) -> None:
    fields: dict[str, Any] = {
        "request_id": record.request_id,
        "method": record.method,
        "model": record.model,
        "status": status,
        "duration_ms": round(duration_s * 1e3, 3),
    }
    if record.usage is not None:
        usage = record.usage
        fields |= {
            "pairs": usage.pairs,
            "cached_pairs": usage.cached_pairs,
            "chunks": usage.chunks,
            "tokens": usage.tokens,
            "batches": usage.batches,
            "queue_ms": round(usage.queue_ns / 1e6, 3),
            "tokenization_ms": round(usage.tokenization_ns / 1e6, 3),
            "inference_ms": round(usage.inference_ns / 1e6, 3),
        }
    logger.info("call %s %s", record.method, status, extra={"fields": fields})


def reranker_for(core: ServingCore, model: str = "") -> Reranker:
    """The Reranker a call's ``model`` names (the default's for none), noted on the call for its access
    log line and metrics."""
    reranker = core.require_reranker(model)
    current_call.get().model = reranker.label
    return reranker


def embedder_for(core: ServingCore, model: str = "") -> Embedder:
    """The Embedder a call's ``model`` names, as ``reranker_for``."""
    embedder = core.require_embedder(model)
    current_call.get().model = embedder.label
    return embedder
