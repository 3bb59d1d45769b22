"""Interceptors: one maps errors to gRPC statuses, logs and measures every call; one checks a bearer token."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from sidecar.errors import InvalidArgument, RequestTooLarge, ServingError, Unauthenticated
from sidecar.transport.calls import REQUEST_ID_KEY, BearerToken, CallLedger, CallRecord
from sidecar.transport.grpc_api.status import status_of

logger = logging.getLogger("sidecar.access")

_OWN_SERVICES_PREFIX = "/rerank.v1."
_OPEN_SERVICES_PREFIX = "/grpc.health.v1.Health/"


def _request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_KEY and value:
            return str(value)
    return uuid.uuid4().hex


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServingError into its status, anything unexpected into INTERNAL; logs and measures every call.

    Only this server's own services are wrapped; health and reflection pass through untouched.
    """

    def __init__(self, ledger: CallLedger, max_message_bytes: int) -> None:
        self.ledger = ledger
        # Checked here rather than left to gRPC core, which refuses a message before any handler runs:
        # no log line, no metric.
        self._max_message_bytes = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(_OWN_SERVICES_PREFIX):
            return handler
        request_id = _request_id(handler_call_details)
        deserializer = _tolerant(handler.request_deserializer, self._max_message_bytes)
        # The wrappers serialize each answer themselves, once, to refuse one over the limit while the
        # call can still say so; gRPC sends the bytes as they are.
        serialize = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, request_id, serialize),
                request_deserializer=deserializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, request_id, serialize),
                request_deserializer=deserializer,
            )
        raise TypeError(f"{method}: only unary and bidirectional-stream methods are wrapped")

    def _wrap_unary(
        self,
        behavior: Callable[..., Awaitable[Any]],
        method: str,
        request_id: str,
        serialize: Callable[[Any], bytes] | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = self.ledger.begin(method, request_id)
            started = time.monotonic_ns()
            status = grpc.StatusCode.OK
            try:
                response = self._serialized(await behavior(_decoded(request), context), serialize)
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                return response
            except BaseException as exc:
                status, message = _status_for(exc, record, context)
                if message is None:
                    raise
                await context.abort(status, message, trailing_metadata=((REQUEST_ID_KEY, request_id),))
            finally:
                self.ledger.finish(record, status.name, started)

        return unary

    def _wrap_stream(
        self,
        behavior: Callable[..., AsyncIterator[Any]],
        method: str,
        request_id: str,
        serialize: Callable[[Any], bytes] | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            record = self.ledger.begin(method, request_id)
            started = time.monotonic_ns()
            status = grpc.StatusCode.OK
            try:
                async for response in behavior(_decoded_stream(request_iterator), context):
                    yield self._serialized(response, serialize)
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            except BaseException as exc:
                status, message = _status_for(exc, record, context)
                if message is None:
                    raise
                await context.abort(status, message, trailing_metadata=((REQUEST_ID_KEY, request_id),))
            finally:
                self.ledger.finish(record, status.name, started)

        return stream

    def _serialized(self, response: Any, serialize: Callable[[Any], bytes] | None) -> Any:
        """The answer's bytes; one gRPC would fail to send is the caller's RESOURCE_EXHAUSTED (left to
        gRPC, it is logged and counted OK)."""
        payload = serialize(response) if serialize is not None else response
        if len(payload) > self._max_message_bytes:
            raise RequestTooLarge(
                f"the answer has {len(payload)} bytes, over the limit of {self._max_message_bytes} "
                "(--max-message-bytes); ask for fewer documents or texts per call, or leave return_text off"
            )
        return payload


@dataclass(frozen=True, slots=True)
class _Oversized:
    """A message over --max-message-bytes, refused once the call is logged and measured."""

    size: int
    limit: int


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """A message that did not parse, such as one whose text is not valid UTF-8."""

    error: DecodeError


def _tolerant(deserializer: Callable[[bytes], Any] | None, max_bytes: int) -> Callable[[bytes], Any] | None:
    """The deserializer, returning an _Undecodable for bytes that do not parse (grpc would answer
    UNKNOWN, where a malformed message is the caller's INVALID_ARGUMENT), and an _Oversized for a
    message over ``max_bytes``."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Oversized(len(data), max_bytes)
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(error)

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Oversized):
        raise RequestTooLarge(
            f"the message has {request.size} bytes, over the limit of {request.limit} "
            "(--max-message-bytes); send fewer or shorter documents per message"
        )
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"the request does not parse ({request.error}); every text field (query, documents[].text, "
            "texts, instruction) must be valid UTF-8"
        )
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` metadata; health stays open for probes.

    It sits inside CallInterceptor, which answers a refused call to this server's own services as it
    answers any error: its status, its request id, its log line and its metrics.
    """

    def __init__(self, token: str) -> None:
        self._token = BearerToken(
            token, send_as="`authorization: Bearer <token>` metadata", carrier="authorization metadata"
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_OPEN_SERVICES_PREFIX):
            return handler
        supplied = next(
            (
                value
                for key, value in handler_call_details.invocation_metadata or ()
                if key == "authorization"
            ),
            "",
        )
        try:
            self._token.check(supplied)
        except Unauthenticated as refused:
            return _refusing(handler, refused, answered_outside=method.startswith(_OWN_SERVICES_PREFIX))
        return handler


def _refusing(
    handler: grpc.RpcMethodHandler, refused: Unauthenticated, *, answered_outside: bool
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends every call refused: raising the error where
    CallInterceptor answers it, aborting with its status elsewhere (reflection)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if answered_outside:
            raise refused
        await context.abort(status_of(refused), str(refused))

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(requests, context)
        yield  # never reached: a generator, as a handler that streams its answers is

    if handler.unary_unary:
        factory, behavior = grpc.unary_unary_rpc_method_handler, refuse
    elif handler.stream_unary:
        factory, behavior = grpc.stream_unary_rpc_method_handler, refuse
    elif handler.unary_stream:
        factory, behavior = grpc.unary_stream_rpc_method_handler, refuse_stream
    else:
        factory, behavior = grpc.stream_stream_rpc_method_handler, refuse_stream
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


_DEADLINE_TIMER_SLACK_S = 0.1


def _status_for(
    exc: BaseException, record: CallRecord, context: grpc.aio.ServicerContext
) -> tuple[grpc.StatusCode, str | None]:
    """The status an error ends the call with, and the message to abort with (None: do not abort)."""
    if isinstance(exc, asyncio.CancelledError):
        # The caller left, or gRPC ended the call at its deadline: nobody to answer either way. gRPC's
        # timer ends a call some milliseconds before the deadline as this process's clock reads it.
        remaining = context.time_remaining()
        if remaining is not None and remaining <= _DEADLINE_TIMER_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED, None
        return grpc.StatusCode.CANCELLED, None
    if isinstance(exc, ServingError):
        return status_of(exc), str(exc)
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN, None  # already aborted by the handler
    logger.error("unexpected error in %s (request %s)", record.method, record.request_id, exc_info=exc)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error; the server log has the details under request id {record.request_id}",
    )
