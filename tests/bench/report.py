"""The figures a bench run measured: one table on the terminal, one JSON file.

Every figure is a value with its unit and, where it has one, the baseline measured in the
same run with the same client, the ratio to it, the aim and whether the aim was met.
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    # "ratio >= 0.6", "value <= 20": what this figure should reach; None when it is context.
    aim: str | None = None
    met: bool | None = None
    notes: dict[str, Any] = field(default_factory=dict)


_COMPARE = {">=": operator.ge, "<=": operator.le}


def _judge(aim: str | None, value: float, ratio: float | None) -> bool | None:
    if aim is None:
        return None
    subject, comparison, bound = aim.split()
    measured = ratio if subject == "ratio" else value
    return None if measured is None else _COMPARE[comparison](measured, float(bound))


def figure(name: str, value: float, unit: str, *, aim: str | None = None, **notes: Any) -> Figure:
    """A figure that stands alone (a latency, say); `aim` like "value <= 20"."""
    return Figure(name, round(value, 3), unit, aim=aim, met=_judge(aim, value, None), notes=notes)


def ratio_figure(name: str, value: float, baseline: float, unit: str, *, aim: str | None = None, **notes: Any) -> Figure:
    """value against a baseline measured in the same run; `aim` like "ratio >= 0.6"."""
    ratio = value / baseline if baseline else 0.0
    return Figure(name, round(value, 1), unit, round(baseline, 1), round(ratio, 3), aim,
                  _judge(aim, value, ratio), notes)


def table(figures: list[Figure]) -> str:
    header = ("figure", "value", "unit", "baseline", "ratio", "aim", "met")
    rows = [
        (
            item.name,
            f"{item.value:g}",
            item.unit,
            "" if item.baseline is None else f"{item.baseline:g}",
            "" if item.ratio is None else f"{item.ratio:.3f}",
            item.aim or "",
            {True: "yes", False: "NO", None: ""}[item.met],
        )
        for item in figures
    ]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(figures: list[Figure], directory: Path, context: dict[str, Any]) -> Path:
    """bench-<UTC time>.json in `directory`; the path written."""
    directory.mkdir(parents=True, exist_ok=True)
    moment = datetime.now(UTC)
    path = directory / f"bench-{moment.strftime('%Y%m%dT%H%M%SZ')}.json"
    document = {"time": moment.isoformat(), **context, "figures": [asdict(item) for item in figures]}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
