"""``rerank-sidecar-healthcheck``: exit 0 when the local server reports SERVING through grpc.health.v1.

For container health checks (Dockerfile.gpu); it imports neither torch nor the model code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--address",
        default=f"127.0.0.1:{os.environ.get('RERANK_PORT', '50051')}",
        help="host:port of the sidecar (default: 127.0.0.1 and $RERANK_PORT or 50051)",
    )
    parser.add_argument("--service", default="", help="service to check; empty means the whole server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    try:
        with grpc.insecure_channel(args.address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"unhealthy: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
