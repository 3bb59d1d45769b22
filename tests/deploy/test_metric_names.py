"""Every sidecar metric that deploy/'s autoscalers query is exported by a running sidecar's /metrics."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from client.local_sidecar import free_port
from tests.conftest import running_sidecar

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def prometheus_queries(document: Any) -> list[str]:
    """The PromQL of a KEDA ScaledObject's prometheus triggers, or of prometheus-adapter rules."""
    if not isinstance(document, dict):  # a JSON patch, or an empty document
        return []
    if document.get("kind") == "ScaledObject":
        return [t["metadata"]["query"] for t in document["spec"]["triggers"] if t["type"] == "prometheus"]
    rules = (document.get("rules") or {}).get("custom") or []
    return [text for rule in rules for text in (rule["seriesQuery"], rule["name"]["matches"])]


def metric_names_the_manifests_query() -> set[str]:
    names: set[str] = set()
    for path in DEPLOY.rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            for query in prometheus_queries(document):
                names |= set(re.findall(r"\brerank_[a-z0-9_]+", query))
    return names


def test_the_autoscalers_query_the_queue_metric():
    assert metric_names_the_manifests_query() == {"rerank_queued_pair_seconds_total"}


async def test_every_metric_the_manifests_query_is_exported(tiny_bert: Path):
    async with running_sidecar(tiny_bert, metrics_port=free_port()) as running:
        url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=10).read().decode()  # noqa: ASYNC210 - a local scrape
    exported = {sample.name for family in text_string_to_metric_families(body) for sample in family.samples}
    missing = metric_names_the_manifests_query() - exported
    assert not missing, f"deploy/ queries metrics the sidecar does not export: {sorted(missing)}"
