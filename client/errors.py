"""The failures a user of the client can cause or meet, each with its exit code.

Each is raised where it is detected (documents, datasets, retrievers, the sidecar client) with a message that
says what went wrong and how to fix it; ``rerank-client`` prints that one line and exits with ``exit_code``.
"""

from __future__ import annotations

from pathlib import Path

import grpc

# ``rerank-client ingest`` exits 1 when it indexed the file but refused some records (it lists them).
DOCUMENTS_REJECTED = 1
# argparse's own status for a flag or value it cannot parse.
USAGE = 2


class ClientError(Exception):
    """A failure with a message meant for the user: what went wrong, then how to fix it."""

    exit_code: int  # every subclass sets its own


class UsageError(ClientError, ValueError):
    """A flag or environment variable whose value cannot work, such as a ``--filters`` that does not parse."""

    exit_code = USAGE


class InputMissing(ClientError):
    """A file or directory named by the user does not exist."""

    exit_code = 3


class InputInvalid(ClientError):
    """A file or directory exists but cannot be read, or is not in the expected format."""

    exit_code = 4


def unreadable(path: Path, what: str, exc: OSError) -> InputMissing | InputInvalid:
    """The error for a user's file (``what`` says which) that could not be opened or read."""
    if isinstance(exc, FileNotFoundError):
        return InputMissing(f"{what} {path} does not exist: check the path")
    if isinstance(exc, IsADirectoryError):
        return InputInvalid(f"{what} {path} is a directory, not a file")
    return InputInvalid(f"cannot read {what} {path} ({exc.strerror or exc}): check its permissions")


class IndexNotFound(ClientError):
    """The index to search (or to add to) does not exist."""

    exit_code = 5


class IndexMismatch(ClientError):
    """The index was built for other vectors (another embedding model or dimension), another format, or
    another text analysis."""

    exit_code = 6


class ElasticsearchUnreachable(ClientError):
    exit_code = 7


class ElasticsearchRefused(ClientError):
    """The cluster refused the credentials (401) or the permissions do not allow the request (403)."""

    exit_code = 8


class ElasticsearchFailed(ClientError):
    """Any other error Elasticsearch answered."""

    exit_code = 9


class SidecarError(ClientError, grpc.RpcError):
    """A failed sidecar call. Still a ``grpc.RpcError`` with ``code()`` and ``details()``, so callers that
    catch gRPC errors keep working."""

    exit_code = 13

    def __init__(self, message: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(message)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class SidecarUnreachable(SidecarError):
    exit_code = 10


class SidecarRefused(SidecarError):
    """UNAUTHENTICATED or PERMISSION_DENIED: the token is missing or wrong."""

    exit_code = 11


class DeadlineExceeded(SidecarError):
    exit_code = 12
