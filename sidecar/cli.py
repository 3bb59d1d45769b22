"""The ``rerank-sidecar`` console script."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from sidecar.settings import Settings, parse_settings


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
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings)
    from sidecar.server import serve  # after logging, so import-time warnings are formatted

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
