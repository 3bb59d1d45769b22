"""A tokenizer process: reads slices of texts on stdin, writes their rows on stdout as flat arrays.

Started by ``TokenizerPool`` as ``python -m sidecar.scheduling.tokenizer_worker``, so it imports only
the tokenizer and numpy, never the serving process's main module. Each message is a pickle behind its
length; the first this process writes says it is ready. A request is ``(key, tokenizer or None, spec,
query, texts)``: a model's tokenizer comes with this process's first slice of that model's rows and is
kept under ``key``. The answer is ``(PackedRows, document_of_pair)``, or the exception the encoding
raised (a request's bad input).
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import IO, Any

from sidecar.errors import ServingError, TokenizationFailure
from sidecar.model.batch import PackedRows
from sidecar.model.tokenization import PairTokenizer, RowEncoder

LENGTH = struct.Struct("!Q")


def frame(message: Any) -> bytes:
    """``message`` pickled, behind its length."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(body)) + body


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """Say it is ready, then answer each request until the serving process closes the pipe."""
    answers.write(frame("ready"))
    answers.flush()
    tokenizers: dict[int, PairTokenizer] = {}
    while (header := _read_exactly(requests, LENGTH.size)) is not None:
        body = _read_exactly(requests, LENGTH.unpack(header)[0])
        if body is None:
            return
        key, tokenizer, spec, query, texts = pickle.loads(body)
        if tokenizer is not None:
            tokenizers[key] = tokenizer
        answer: object
        try:
            encoded = RowEncoder(tokenizers[key], spec, query)(texts)
            answer = (PackedRows.of(encoded.pairs), encoded.document_of_pair)
        except ServingError as error:  # the request's own fault, told to its caller
            answer = error
        except Exception as error:
            answer = TokenizationFailure(f"tokenization failed: {type(error).__name__}: {error}")
        answers.write(frame(answer))
        answers.flush()


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group; the serving process decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The answers keep stdout's pipe to themselves: anything else written to stdout, by Python or by a
    # library's C code, goes to stderr (the serving process's log) instead of into an answer.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, answers)
