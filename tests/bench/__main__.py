"""`make bench` (python -m tests.bench): every part, or `--only credits`; one table, one JSON.

Each part starts what it measures as real processes on loopback and reports its figures as
ratios to a baseline measured in the same run with the same client, because the machine is
shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time

from tests.bench import (
    credits_bench,
    downloads_bench,
    jobs_bench,
    outbox_bench,
    portraits_bench,
    preview_bench,
    provider_bench,
    story_bench,
)
from tests.bench.report import Figure, table, write_json
from tools.infra import REPO_ROOT

PARTS = {
    "story": story_bench,
    "credits": credits_bench,
    "outbox": outbox_bench,
    "downloads": downloads_bench,
    "portraits": portraits_bench,
    "jobs": jobs_bench,
    "providers": provider_bench,
    "previews": preview_bench,
}
RESULTS_DIR = REPO_ROOT / ".run" / "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(PARTS),
                        help="run this part only (repeat for several); default: every part")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per ratio")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one round")
    for part in PARTS.values():
        part.add_arguments(parser)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> list[Figure]:
    figures: list[Figure] = []
    for name in args.only or list(PARTS):
        started = time.perf_counter()
        figures += await PARTS[name].run(args)
        print(f"bench: {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = asyncio.run(run(args))
    context = {
        "parts": args.only or list(PARTS),
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    path = write_json(figures, RESULTS_DIR, context)
    print(table(figures))
    print(f"\nfigures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
