"""Two sidecar replicas behind the client's round_robin: stopping one mid-run fails no call."""

from __future__ import annotations

import asyncio
from pathlib import Path

from client.sidecar_client import AsyncRerankClient
from tests.conftest import running_sidecar

DOCUMENTS = ["Cats are obligate carnivores.", "The stock market fell.", "Kittens need protein."]


async def test_stopping_a_replica_mid_run_fails_no_call(tiny_bert: Path):
    async with running_sidecar(tiny_bert) as first, running_sidecar(tiny_bert) as second:
        addresses = f"127.0.0.1:{first.server.port},127.0.0.1:{second.server.port}"
        answered = 0
        halfway = asyncio.Event()

        async with AsyncRerankClient(addresses, timeout=30) as client:

            async def caller() -> None:
                nonlocal answered
                for _ in range(20):
                    ranking = await client.rerank("what do cats eat", DOCUMENTS)
                    assert len(ranking.results) == len(DOCUMENTS)
                    answered += 1
                    if answered == 20:
                        halfway.set()

            async def stop_first_replica() -> None:
                await halfway.wait()
                await first.server.stop(grace=2.0)

            second_batches_at_stop = len(second.engine.batches)
            await asyncio.gather(*(caller() for _ in range(4)), stop_first_replica())

        assert answered == 80
        assert len(first.engine.batches) > 0  # the first replica served calls before it stopped
        assert len(second.engine.batches) > second_batches_at_stop
