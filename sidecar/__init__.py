"""Reranking sidecar: rerankers and an embedder behind dynamic batchers, served over gRPC and HTTP/JSON."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rerank-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
