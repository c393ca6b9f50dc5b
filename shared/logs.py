"""One JSON object per log line, with secrets redacted by key name.

Modules log with `log.info("portrait.object_stored", extra={"story_id": ...})`; the message
is the stable event name and every `extra` field becomes a top-level key.

Event names follow one scheme in every service: `<area>.<thing>_<past participle>`, all
lowercase, e.g. `story.write_failed`, `outbox.batch_published`, `consumer.message_retried`.
The area is the part of the system (service, config, rpc, story, outbox, consumer,
portrait, writer, provider, ...); the rest says what happened to what, in the past tense.
tests/unit/test_log_events.py holds every service to it.

A pipeline step (see `logged_step`) logs `<area>.step_started`, then `<area>.step_succeeded`
or `<area>.step_failed`, each with the same keys: story_id, attempt, step, duration_ms and
error (null where they do not apply yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

_REDACTED = "***"
_SECRET_KEY_PARTS = ("token", "secret", "password", "api_key", "apikey", "authorization")
# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime"}


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    # Cached: the keys are a few dozen names from the code, and this ran for every field of
    # every line (a fifth of a line's cost, measured on the outbox relay's publish lines).
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def _jsonable(value: Any) -> Any:
    if type(value) in _PLAIN_TYPES or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {
            str(key): _REDACTED if is_secret_key(str(key)) else _jsonable(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(item) for item in value]
    return str(value)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _rfc3339(record.created),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = _REDACTED if is_secret_key(key) else _jsonable(value)
        if record.exc_info:
            # A caller's own short `error` wins; the traceback still goes out beside it.
            key = "traceback" if "error" in line else "error"
            line[key] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


def _rfc3339(created: float) -> str:
    seconds = int(created)
    return f"{_rfc3339_second(seconds)}.{int((created - seconds) * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _rfc3339_second(seconds: int) -> str:
    """The date and time to the second, once per second rather than once per line."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


_CHATTY_LIBRARIES = ("httpx", "botocore.credentials")


class _JsonHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stderr by default) as JSON; safe to call again."""
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _JsonHandler):
            root.removeHandler(handler)
    # Resolved at call time, not import time, so a replaced sys.stderr is honoured.
    handler = _JsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Libraries that log their own routine at INFO: httpx a line per request ("HTTP Request:
    # POST ..."), botocore where it found credentials. Those lines carry none of our ids and
    # break the event-name scheme; our steps already log each call with its ids and duration.
    # Their warnings and errors still come through, and all of it at DEBUG.
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if numeric_level <= logging.DEBUG else logging.WARNING)
    # The logging HOWTO's "Optimization": no line carries the caller's file and line, thread
    # or process, so the records need not look them up (a stack walk per line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _describe_error(error: BaseException) -> str:
    return str(error) or type(error).__name__


@contextlib.contextmanager
def logged_step(
    logger: logging.Logger,
    area: str,
    step: str,
    ids: Mapping[str, Any],
    *,
    describe: Callable[[BaseException], str] = _describe_error,
    observe: Callable[[str, bool, float], None] | None = None,
    log_start: bool = True,
    log_success: bool = True,
    **fields: Any,
) -> Iterator[dict[str, Any]]:
    """Logs one pipeline step: started, then succeeded or failed, with its duration.

    `ids` names what the step works on (story_id and attempt for the portrait pipeline);
    the dict it yields takes fields that only the step's result knows, for the last line;
    `observe(step, ok, seconds)` records the step in a metric as well. The exception, if
    any, goes on unchanged. A cancellation (a shutdown, a cancelled job) is no failure: it
    logs `<area>.step_interrupted` at INFO and counts in no metric, since the step runs again
    on redelivery or was not wanted any more. `log_start=False`
    leaves out the first line, for steps too short and too many for it to tell anything;
    `log_success=False` the last one too when it succeeds (a failure is always logged), for
    steps whose success another line already says.
    """
    line = {**ids, "step": step, **fields}
    if log_start:
        logger.info(f"{area}.step_started", extra={**line, "duration_ms": None, "error": None})
    started = time.perf_counter()
    outcome: dict[str, Any] = {}
    try:
        yield outcome
    except asyncio.CancelledError:
        seconds = time.perf_counter() - started
        logger.info(f"{area}.step_interrupted", extra={**line, **outcome, "duration_ms": round(seconds * 1000, 1),
                                                       "error": None})  # fmt: skip
        raise
    except BaseException as error:
        seconds = time.perf_counter() - started
        logger.warning(
            f"{area}.step_failed",
            extra={**line, **outcome, "duration_ms": round(seconds * 1000, 1), "error": describe(error)},
        )
        if observe is not None:
            observe(step, False, seconds)
        raise
    seconds = time.perf_counter() - started
    if log_success:
        logger.info(
            f"{area}.step_succeeded", extra={**line, **outcome, "duration_ms": round(seconds * 1000, 1), "error": None}
        )
    if observe is not None:
        observe(step, True, seconds)
