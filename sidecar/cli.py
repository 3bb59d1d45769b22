"""The ``rerank-sidecar`` console script."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from sidecar.logs import configure_logging
from sidecar.settings import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings)
    from sidecar.server import serve  # after logging, so import-time warnings are formatted

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
