import asyncio
import io
import json
import logging
from datetime import datetime

import pytest

from shared.config import Secret
from shared.logs import configure_logging, logged_step


@pytest.fixture
def log_stream():
    """A configured root logger writing to a buffer; handlers and level restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("story", "DEBUG", stream=stream)
    yield stream
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_extras(log_stream):
    logging.getLogger("services.story.domain").info(
        "story.created", extra={"story_id": "s1", "chapters": 3}
    )
    [line] = lines(log_stream)
    assert line["event"] == "story.created"
    assert line["level"] == "INFO"
    assert line["service"] == "story"
    assert line["logger"] == "services.story.domain"
    assert line["story_id"] == "s1" and line["chapters"] == 3
    assert line["time"].endswith("Z")
    datetime.fromisoformat(line["time"].replace("Z", "+00:00"))


def test_secret_named_keys_are_redacted(log_stream):
    logging.getLogger("t").warning(
        "call.made",
        extra={
            "token": "tok-1",
            "api_key": "k-2",
            "Authorization": "Bearer b-3",
            "db_password": "p-4",
            "client_secret": "s-5",
            "headers": {"authorization": "Bearer h-6", "accept": "image/png"},
            "key": Secret("k-7"),
        },
    )
    raw = log_stream.getvalue()
    for secret in ("tok-1", "k-2", "b-3", "p-4", "s-5", "h-6", "k-7"):
        assert secret not in raw
    [line] = lines(log_stream)
    assert line["token"] == "***"
    assert line["headers"] == {"authorization": "***", "accept": "image/png"}
    assert line["key"] == "Secret(***)"


def test_unserialisable_values_become_strings(log_stream):
    class Thing:
        def __str__(self):
            return "a thing"

    logging.getLogger("t").info("x", extra={"thing": Thing(), "ids": ("a", "b"), "raw": b"\x00"})
    [line] = lines(log_stream)
    assert line["thing"] == "a thing"
    assert line["ids"] == ["a", "b"]
    assert line["raw"] == "b'\\x00'"


def test_exception_goes_into_error(log_stream):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("step.failed", extra={"story_id": "s1"})
    [line] = lines(log_stream)
    assert line["level"] == "ERROR"
    assert "ValueError: boom" in line["error"]
    assert "Traceback" in line["error"]


def test_caller_error_kept_and_traceback_added(log_stream):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("t").exception("step.failed", extra={"error": "short"})
    [line] = lines(log_stream)
    assert line["error"] == "short"
    assert "ValueError: boom" in line["traceback"]


def test_configure_twice_does_not_duplicate(log_stream):
    second = io.StringIO()
    configure_logging("story", "INFO", stream=second)
    configure_logging("story", "INFO", stream=second)
    logging.getLogger("t").info("once")
    logging.getLogger("t").debug("below level")
    assert [line["event"] for line in lines(second)] == ["once"]
    assert log_stream.getvalue() == ""


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("story", "CHATTY", stream=io.StringIO())


def test_libraries_routine_info_lines_stay_out_unless_debugging(log_stream):
    """httpx logs every request at INFO, without our ids; at INFO only its warnings pass."""
    quiet = io.StringIO()
    configure_logging("image", "INFO", stream=quiet)
    logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1/v1 "HTTP/1.1 200 OK"')
    logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
    logging.getLogger("httpx").warning("provider.connection_dropped")
    assert [line["event"] for line in lines(quiet)] == ["provider.connection_dropped"]

    debugging = io.StringIO()
    configure_logging("image", "DEBUG", stream=debugging)
    logging.getLogger("httpx").info("HTTP Request: GET http://127.0.0.1/")
    assert [line["event"] for line in lines(debugging)] == ["HTTP Request: GET http://127.0.0.1/"]


def test_a_cancelled_step_is_logged_as_interrupted_not_failed(log_stream):
    seen = []
    step_log = logging.getLogger("test.steps")
    with pytest.raises(asyncio.CancelledError):
        with logged_step(step_log, "job", "generate", {"job_id": "j1"}, observe=lambda *a: seen.append(a)):
            raise asyncio.CancelledError()
    with pytest.raises(ValueError):
        with logged_step(step_log, "job", "upload", {"job_id": "j1"}, observe=lambda *a: seen.append(a)):
            raise ValueError("boom")

    ends = [(line["event"], line["level"], line["step"]) for line in lines(log_stream) if line["event"] != "job.step_started"]
    assert ends == [("job.step_interrupted", "INFO", "generate"), ("job.step_failed", "WARNING", "upload")]
    assert [(step, ok) for step, ok, _ in seen] == [("upload", False)]  # an interruption is no failure in the metric
