"""Every log event name in the services, shared/ and tools/ follows one scheme
(shared/logs.py): `<area>.<thing>_<past participle>`, lowercase, e.g. `story.write_failed`.

Read from the source, so a new log line that breaks the scheme fails here at once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(path for folder in ("services", "shared", "tools") for path in (ROOT / folder).rglob("*.py"))
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}
NAME = re.compile(r"^(?P<area>[a-z][a-z0-9]*)\.(?P<rest>[a-z0-9]+(?:_[a-z0-9]+)*)$")
# Past participles that do not end in -ed.
IRREGULAR = {"done", "kept", "lost", "found", "sent", "begun", "run", "written", "given", "taken", "held", "left",
             "shut", "made", "bound", "gone", "read", "set", "seen", "known", "hung", "thrown", "put", "cut",
             "overridden", "broken", "chosen", "hidden", "driven", "forgotten"}  # fmt: skip


def _event_names(path: Path) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        receiver = node.func.value
        is_logger = isinstance(receiver, ast.Name) and receiver.id in {"log", "logger", "logging"}
        if node.func.attr in LOG_METHODS and is_logger:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.append((node.lineno, first.value))
            elif isinstance(first, ast.JoinedStr):  # f"{area}.step_started": the literal parts count
                names.append((node.lineno, _shape_of(first)))
    return names


def _shape_of(template: ast.JoinedStr) -> str:
    """An f-string event name with each placeholder read as a plain word: f"{area}.step_started"
    is checked as "x.step_started", f"credits.{what}_refused" as "credits.x_refused"."""
    return "".join(str(part.value) if isinstance(part, ast.Constant) else "x" for part in template.values)


def scheme_problem(name: str) -> str | None:
    match = NAME.match(name)
    if match is None:
        return "is not <area>.<thing>_<past participle> in lowercase"
    last = match["rest"].rsplit("_", 1)[-1]
    if match["rest"].endswith("timed_out"):
        return None
    if not (last.endswith("ed") or last in IRREGULAR):
        return f"ends in {last!r}, not a past participle"
    return None


def test_the_sources_log_some_events():
    assert sum(len(_event_names(path)) for path in SOURCES) > 100


@pytest.mark.parametrize("path", SOURCES, ids=[str(path.relative_to(ROOT)) for path in SOURCES])
def test_every_event_name_follows_the_scheme(path):
    problems = [f"line {line}: {name!r} {scheme_problem(name)}" for line, name in _event_names(path) if scheme_problem(name)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("name", "ok"),
    [("story.write_failed", True), ("service.started", True), ("consumer.message_done", True),
     ("portrait.ready", False), ("consumer.message_retry", False), ("Story.Created", False), ("created", False)],
)  # fmt: skip
def test_the_scheme_itself(name, ok):
    assert (scheme_problem(name) is None) is ok
