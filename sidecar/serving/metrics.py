"""Prometheus metrics, served on their own port: calls, queue depth, batch shapes and stage latencies."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.serving.score_cache import ScoreCache
from sidecar.serving.usage import Usage

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PAIR_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class QueuedPairSeconds(Collector):
    """``rerank_queued_pair_seconds_total{model}``: pairs waiting for the model, integrated over time.

    Its rate is the mean queue depth over the rate's window, exact whatever the scrape interval,
    where a sampled gauge sees only the instants of its scrapes: the signal autoscalers use.
    """

    def __init__(self) -> None:
        self._readers: dict[str, Callable[[], float]] = {}

    def watch(self, model: str, pair_seconds: Callable[[], float]) -> None:
        self._readers[model] = pair_seconds

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "rerank_queued_pair_seconds",
            "Pairs waiting for the model, integrated over time (pair-seconds), by model: its rate is "
            "the mean number of pairs queued.",
            labels=("model",),
        )
        for model, read in self._readers.items():
            family.add_metric((model,), read())
        yield family


class ScoreCacheMetrics(Collector):
    """Each model's score cache, read at scrape time: ``rerank_score_cache_hits_total`` and
    ``rerank_score_cache_misses_total`` (pairs looked up and found, or not) and ``rerank_score_cache_pairs``
    (pairs held)."""

    def __init__(self) -> None:
        self._caches: dict[str, ScoreCache] = {}

    def watch(self, model: str, cache: ScoreCache) -> None:
        self._caches[model] = cache

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hits = CounterMetricFamily(
            "rerank_score_cache_hits", "Pairs answered from the score cache, by model.", labels=("model",)
        )
        misses = CounterMetricFamily(
            "rerank_score_cache_misses",
            "Pairs looked up in the score cache and not found (then computed), by model; pairs of an engine "
            "the cache does not serve are not looked up.",
            labels=("model",),
        )
        size = GaugeMetricFamily(
            "rerank_score_cache_pairs", "Pairs the score cache holds, by model.", labels=("model",)
        )
        for model, cache in self._caches.items():
            hits.add_metric((model,), cache.hits)
            misses.add_metric((model,), cache.misses)
            size.add_metric((model,), len(cache))
        yield from (hits, misses, size)


class Metrics:
    """One registry per server, so several servers in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rerank_requests",
            "Calls by method, model (its served name; empty for calls that choose none) and status: the "
            "gRPC status code, or the HTTP status of http: methods.",
            ("method", "model", "code"),
            registry=self.registry,
        )
        self.queued_pairs = Gauge(
            "rerank_queued_pairs",
            "Pairs (or texts) waiting for the model, by model.",
            ("model",),
            registry=self.registry,
        )
        self.queued_pair_seconds = QueuedPairSeconds()
        self.registry.register(self.queued_pair_seconds)
        self.batch_pairs = Histogram(
            "rerank_batch_pairs",
            "Pairs per model batch.",
            ("model",),
            buckets=_PAIR_BUCKETS,
            registry=self.registry,
        )
        self.batch_tokens = Histogram(
            "rerank_batch_tokens",
            "Tokens per model batch, padding included.",
            ("model",),
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "rerank_stage_seconds",
            "Seconds a call spent per stage (queue, tokenization, inference and total), by method and model.",
            ("method", "model", "stage"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.non_finite_requests = Counter(
            "rerank_non_finite_requests",
            "Requests failed because the engine gave a NaN or infinite output for them, by model and "
            "engine (name/precision); such outputs are never served.",
            ("model", "engine"),
            registry=self.registry,
        )
        self.score_cache = ScoreCacheMetrics()
        self.registry.register(self.score_cache)
        self.engine = Info(
            "rerank_engine", "Engine and precision serving each model.", ("model",), registry=self.registry
        )

    def record_call(self, method: str, model: str, code: str, usage: Usage | None, duration_s: float) -> None:
        self.requests.labels(method, model, code).inc()
        self.stage_seconds.labels(method, model, "total").observe(duration_s)
        if usage is not None:
            self.stage_seconds.labels(method, model, "queue").observe(usage.queue_ns / 1e9)
            self.stage_seconds.labels(method, model, "tokenization").observe(usage.tokenization_ns / 1e9)
            self.stage_seconds.labels(method, model, "inference").observe(usage.inference_ns / 1e9)

    def batch_observer(self, model: str) -> Callable[[int, int], None]:
        """A callback for the batcher: (pairs, padded tokens) of each batch it runs."""
        pairs_histogram = self.batch_pairs.labels(model)
        tokens_histogram = self.batch_tokens.labels(model)

        def observe(pairs: int, padded_tokens: int) -> None:
            pairs_histogram.observe(pairs)
            tokens_histogram.observe(padded_tokens)

        return observe

    def watch_queue(
        self, model: str, queued_pairs: Callable[[], int], queued_pair_seconds: Callable[[], float]
    ) -> None:
        self.queued_pairs.labels(model).set_function(queued_pairs)
        self.queued_pair_seconds.watch(model, queued_pair_seconds)

    def describe_engine(self, model: str, engine: str, precision: str, device: str, kind: str) -> None:
        self.engine.labels(model).info(
            {"engine": engine, "precision": precision, "device": device, "kind": kind}
        )
