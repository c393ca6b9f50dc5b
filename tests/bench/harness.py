"""What every bench part needs: a database of its own, the services' environment, and a
calls-per-second meter that alternates a measurement with its baseline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from shared.auth import bearer_metadata
from tools.infra import (
    DEFAULT_DATABASE_URL,
    create_database,
    drop_database,
    dsn_with_database,
    ensure_postgres_running,
)

TOKENS = {"admin": "bench-admin", "gateway": "bench-gateway", "story": "bench-story", "image": "bench-image"}
AS_GATEWAY = bearer_metadata(TOKENS["gateway"])
AS_IMAGE = bearer_metadata(TOKENS["image"])
AS_ADMIN = bearer_metadata(TOKENS["admin"])

Call = Callable[[], Awaitable[object]]


@contextlib.asynccontextmanager
async def bench_database() -> AsyncIterator[str]:
    """A fresh database on the server DATABASE_URL names, dropped afterwards; its DSN."""
    server_dsn = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    ensure_postgres_running(server_dsn)
    admin_dsn = dsn_with_database(server_dsn, "postgres")
    name = f"casefile_bench_{uuid.uuid4().hex[:8]}"
    await create_database(admin_dsn, name)
    dsn = dsn_with_database(admin_dsn, name)
    try:
        yield dsn
    finally:
        await drop_database(admin_dsn, name)


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def base_env(database_url: str) -> dict[str, str]:
    """What a service process of the bench starts with; each part adds its own."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", ""),
        "DATABASE_URL": database_url,
        "AUTH_TOKENS": ",".join(f"{name}:{token}" for name, token in TOKENS.items()),
    }


async def calls_per_second(call: Call, seconds: float, concurrency: int) -> float:
    """Runs `concurrency` callers back to back for `seconds`; returns completed calls/s."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


@dataclass(frozen=True)
class Paired:
    """Medians of a measurement and its baseline taken in alternating rounds."""

    value: float
    baseline: float
    ratio: float
    ratios: list[float]


async def alternating_rates(measures: dict[str, Callable[[], Awaitable[float]]], rounds: int) -> dict[str, list[float]]:
    """Each measure once per round, in turn, so that a burst of machine noise hits them all."""
    rates: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            rates[name].append(await measure())
    return rates


def paired(values: list[float], baselines: list[float]) -> Paired:
    ratios = [value / base for value, base in zip(values, baselines, strict=True)]
    return Paired(statistics.median(values), statistics.median(baselines), statistics.median(ratios),
                  [round(ratio, 3) for ratio in ratios])


async def paired_rates(
    measured: Callable[[], Awaitable[float]], baseline: Callable[[], Awaitable[float]], rounds: int
) -> Paired:
    """Alternates baseline and measurement so that a burst of machine noise hits both."""
    rates = await alternating_rates({"baseline": baseline, "measured": measured}, rounds)
    return paired(rates["measured"], rates["baseline"])
