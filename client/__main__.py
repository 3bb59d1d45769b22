"""The ``rerank-client`` command (also ``python -m client``)."""

from __future__ import annotations

import os
import sys


def main() -> int:
    # gRPC core reads its log level once, when grpc is imported; at its default it prints INFO lines (a GOAWAY
    # from a sidecar that is stopping) beside the command's own one-line errors. A caller's setting wins.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from client.cli import main as run_command

    return run_command()


if __name__ == "__main__":
    sys.exit(main())
