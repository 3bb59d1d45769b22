"""gRPC reranking sidecar: a cross-encoder behind a dynamic batcher, served over gRPC."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rerank-sidecar")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
