"""Around every call route: the bearer token, the body limit, the deadline header, the access log and
metrics, and cancelling a call whose caller hung up, so its queued work is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers

from sidecar.errors import DeadlineExpired, InvalidArgument, NotReady, RequestTooLarge, ServingError
from sidecar.transport.calls import REQUEST_ID_KEY, BearerToken, CallLedger, CallRecord
from sidecar.transport.http_api.status import error_response

logger = logging.getLogger("sidecar.access")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# The HTTP APIs have no deadline field; this header carries one, in seconds, like gRPC's timeout.
TIMEOUT_HEADER = "x-request-timeout"
# nginx's status for a request whose client closed the connection first; logged, never sent.
CLIENT_CLOSED_STATUS = 499


class CallMiddleware:
    """Wraps the routes in ``call_paths``; every other path (health, metrics, docs) passes untouched."""

    def __init__(
        self,
        app: App,
        ledger: CallLedger,
        *,
        call_paths: frozenset[str],
        auth_token: str,
        max_body_bytes: int,
    ) -> None:
        self._app = app
        self._ledger = ledger
        self._call_paths = call_paths
        self._token = (
            BearerToken(
                auth_token,
                send_as="an `Authorization: Bearer <token>` header",
                carrier="Authorization header",
            )
            if auth_token
            else None
        )
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self._call_paths:
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # A header's bytes reach us decoded as Latin-1: they are echoed as sent, and logged as UTF-8.
        sent_id = headers.get(REQUEST_ID_KEY, "").encode("latin-1")
        request_id = sent_id.decode(errors="backslashreplace") or uuid.uuid4().hex
        echoed_id = sent_id or request_id.encode()
        record = self._ledger.begin(f"http:{scope['path']}", request_id)
        started = time.monotonic_ns()
        status = CLIENT_CLOSED_STATUS

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_KEY.encode(), echoed_id),
                ]
            await send(message)

        try:
            self._admit(headers, record)
            await self._run(scope, receive, send_with_request_id, record)
        except ServingError as error:
            await error_response(scope["path"], error)(scope, receive, send_with_request_id)
        except asyncio.CancelledError:
            # The server stops with the call still running (the drain's grace passed): a 503 the caller
            # retries on another replica, where uvicorn would answer 500; answered, the call ends here,
            # not as an error in uvicorn's log.
            if status != CLIENT_CLOSED_STATUS:  # an answer had begun: nothing more to say
                raise
            stopping = NotReady("the server is stopping; retry on another replica")
            await error_response(scope["path"], stopping)(scope, receive, send_with_request_id)
        except Exception:  # the route already answered 500 (internal_error_response); keep the details here
            logger.exception("unexpected error in %s (request %s)", record.method, request_id)
        finally:
            self._ledger.finish(record, str(status), started)

    def _admit(self, headers: Headers, record: CallRecord) -> None:
        """Refuse, before reading the body, a call without the token, too large, or with a bad timeout."""
        if self._token is not None:
            self._token.check(headers.get("authorization", ""))
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body_bytes:
            raise self._too_large(int(length))
        timeout = headers.get(TIMEOUT_HEADER)
        if timeout is not None:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = -1.0
            if not seconds > 0 or seconds == float("inf"):
                raise InvalidArgument(f"X-Request-Timeout {timeout!r} is not a positive number of seconds")
            record.deadline = time.monotonic() + seconds

    def _too_large(self, size: int) -> RequestTooLarge:
        return RequestTooLarge(
            f"the request body has {size} bytes, over the limit of {self._max_body_bytes} "
            "(--max-message-bytes); send fewer or shorter documents per request"
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, refused once it passes the limit; None when the caller hung up first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise self._too_large(size)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _run(self, scope: Scope, receive: Receive, send: Send, record: CallRecord) -> None:
        """Run the route on the body read here; cancel it when its caller hangs up or its deadline
        passes, which drops its work from the queue."""
        body = await self._read_body(receive)
        if body is None:
            return
        disconnected = asyncio.Event()
        replayed = False

        async def replay_body() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def watch_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        route = asyncio.create_task(self._app(scope, replay_body, send))
        watcher = asyncio.create_task(watch_for_disconnect())
        try:
            timeout = None if record.deadline is None else max(0.0, record.deadline - time.monotonic())
            done, _ = await asyncio.wait(
                {route, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if route in done:
                route.result()
                return
            route.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await route
            if not done:
                raise DeadlineExpired("the deadline (X-Request-Timeout) passed before the request finished")
        finally:
            watcher.cancel()
            if not route.done():  # this call was cancelled (the server stops): so is its work
                route.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await route
