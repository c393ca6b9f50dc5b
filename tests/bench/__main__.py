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
import traceback
from dataclasses import dataclass, field

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
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    for part in PARTS.values():
        part.add_arguments(parser)
    return parser.parse_args(argv)


@dataclass
class Run:
    figures: list[Figure] = field(default_factory=list)
    seconds_per_part: dict[str, float] = field(default_factory=dict)
    # part -> the error that ended it: one part's failure must not throw away what the
    # others measured, but it must still fail the run.
    failed_parts: dict[str, str] = field(default_factory=dict)


async def run(args: argparse.Namespace) -> Run:
    result = Run()
    for name in args.only or list(PARTS):
        started = time.perf_counter()
        try:
            result.figures += await PARTS[name].run(args)
        except Exception as error:  # noqa: BLE001 - reported below and in the exit status
            traceback.print_exc()
            result.failed_parts[name] = f"{type(error).__name__}: {error}"
        result.seconds_per_part[name] = round(time.perf_counter() - started, 1)
        print(f"bench: {name} took {result.seconds_per_part[name]:.0f} s", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    figures = result.figures
    context = {
        "parts": args.only or list(PARTS),
        "seconds_per_part": result.seconds_per_part,
        "seconds_in_all": round(sum(result.seconds_per_part.values()), 1),
        "failed_parts": result.failed_parts,
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    path = write_json(figures, RESULTS_DIR, context)
    print(table(figures))
    print(f"\nfigures written to {path}; the run took {context['seconds_in_all']:.0f} s")
    for name, error in result.failed_parts.items():
        print(f"bench: part {name} FAILED: {error}", file=sys.stderr)
    return 1 if result.failed_parts else 0


if __name__ == "__main__":
    sys.exit(main())
