"""The ledger as Prometheus sees it: totals by kind, read from SQL at each scrape.

The ledger is append-only, so its per-kind entry counts and amounts only ever grow: they
are counters, read fresh when Prometheus scrapes rather than counted in the write paths
(nothing in the domain needs to know). Every credits process reports the same totals, so
aggregate with max(), not sum(). One GROUP BY over the ledger per scrape; should the ledger
grow to millions of entries, keep per-kind totals in a table written with each entry instead.
"""

from __future__ import annotations

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from shared.metrics import ScrapeCollector

_TOTALS_BY_KIND = """
    SELECT kind, count(*) AS entries, coalesce(sum(abs(amount)), 0)::bigint AS moved,
           coalesce(sum(amount), 0)::bigint AS net
      FROM credits.ledger_entries GROUP BY kind ORDER BY kind
"""
SCRAPE_TIMEOUT_SECONDS = 2.0


def ledger_metrics(pool: asyncpg.Pool) -> ScrapeCollector:
    """Registers the ledger totals with the process's metrics; close() unregisters them."""

    async def read() -> list[Metric]:
        async with pool.acquire(timeout=SCRAPE_TIMEOUT_SECONDS) as conn:
            rows = await conn.fetch(_TOTALS_BY_KIND, timeout=SCRAPE_TIMEOUT_SECONDS)
        entries = CounterMetricFamily(
            "casefile_ledger_entries", "Ledger entries written, by kind (GRANT, CHARGE, REFUND, ADJUSTMENT).", labels=["kind"]
        )
        moved = CounterMetricFamily(
            "casefile_ledger_amount_hundredths",
            "Credits moved by ledger entries, by kind: the sum of |amount| in hundredths of a credit.",
            labels=["kind"],
        )
        net = GaugeMetricFamily(
            "casefile_ledger_net_hundredths",
            "The signed sum of the ledger by kind, in hundredths of a credit; over all kinds, every balance together.",
            labels=["kind"],
        )
        for row in rows:
            entries.add_metric([row["kind"]], row["entries"])
            moved.add_metric([row["kind"]], row["moved"])
            net.add_metric([row["kind"]], row["net"])
        return [entries, moved, net]

    return ScrapeCollector("credits.ledger", read, timeout=SCRAPE_TIMEOUT_SECONDS + 0.5)
