"""The process's log lines: text or one JSON object a line (--log-format), at --log-level, on stderr.

In a module of its own, so a child process (the engine selection's) logs as its parent does.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from sidecar.settings import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields passed as ``extra={"fields": {...}}`` are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    """Every line on stderr a log line: Python warnings (an ONNX export's) become log records, gRPC
    core prints its errors only, and in JSON the Hugging Face libraries draw no progress bars (the
    libraries read these variables when imported, after this; a caller's setting wins)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    logging.captureWarnings(True)
