"""A bounded load test on loopback: mixed adapters, no errors under the queue limit, 429s past it, flat memory."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.api.app import create_app
from tests.api.conftest import tiny_settings
from tests.servers import serve

CLASSIFIERS = ["lora-cls", "lora-cls3", "prefix-cls", "prefix-proj-cls"]
GENERATORS = [None, "lora-gen", "prefix-gen", "prefix-proj-gen", "lora-gen-mlp"]


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def server(tiny_base: Path, tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("load") / "store"
    shutil.copytree(tiny_store, store)
    settings = tiny_settings(store, base_model=str(tiny_base), max_queue_size=64, max_batch_size=32)
    # Long keep-alive: with hundreds of waiting clients, a pooled connection may sit idle for seconds.
    with serve(create_app(settings), timeout_keep_alive=120) as url:
        yield url


async def _fire(url: str, count: int, concurrency: int, seed: int) -> Counter:
    rng = random.Random(seed)
    statuses: Counter = Counter()
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def one(index: int) -> None:
            async with semaphore:
                if index % 8 == 0:
                    body = {"adapter": rng.choice(GENERATORS), "prompt": "load test", "max_new_tokens": 2}
                    response = await client.post("/v1/generate", json=body)
                else:
                    body = {"adapter": rng.choice(CLASSIFIERS), "inputs": "load test " * rng.randint(1, 8)}
                    response = await client.post("/v1/classify", json=body)
                statuses[response.status_code] += 1

        await asyncio.gather(*(one(i) for i in range(count)))
    return statuses


def test_ten_thousand_requests_below_the_queue_limit(server: str) -> None:
    warm = asyncio.run(_fire(server, 1000, 32, seed=1))
    assert warm == Counter({200: 1000})
    before = _rss_bytes()
    statuses = asyncio.run(_fire(server, 10_000, 32, seed=2))
    grown = _rss_bytes() - before
    assert statuses == Counter({200: 10_000})
    assert grown < 64 * 1024 * 1024, f"memory grew by {grown / 2**20:.0f} MiB over 10,000 requests"


def test_past_the_queue_limit_requests_get_429_and_the_rest_succeed(server: str) -> None:
    statuses = asyncio.run(_fire(server, 600, 300, seed=3))  # far more in flight than the queue holds
    assert set(statuses) <= {200, 429} and statuses[429] > 0 and statuses[200] > 0
    assert asyncio.run(_fire(server, 50, 8, seed=4)) == Counter({200: 50})
