"""The whole stack exactly as `make run` starts it: `python -m tools.stack` as a subprocess.

The launcher gets an environment of its own: this test's database, a NATS port and an S3
port where nothing listens (so it starts its own nats-server and rclone), free service
ports and a run directory under tmp_path. Only AUTH_TOKENS is left to its dev defaults, so
the test calls the services the way the README tells a person to.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image

from casefile.credits.v1 import credits_service_pb2, credits_service_pb2_grpc
from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from casefile.story.v1 import story_service_pb2 as story_pb
from casefile.story.v1 import story_service_pb2_grpc
from shared.auth import bearer_metadata
from tests.scrape import scrape
from tools.infra import FAST_RECONNECT, REPO_ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

READY_BANNER = "casefile is running"
# The launcher's dev default for the gateway (AUTH_TOKENS is deliberately left unset).
GATEWAY = bearer_metadata("dev-gateway")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINAL_STATUSES = {
    story_pb.PORTRAIT_STATUS_READY,
    story_pb.PORTRAIT_STATUS_FAILED,
    story_pb.PORTRAIT_STATUS_SKIPPED,
}
FIRST_START_TIMEOUT_S = 90.0
# Migrations, the JetStream store and the bucket already exist on the second start.
SECOND_START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
PORTRAIT_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0
INHERITED_VARIABLES = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")


# ---------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid plus its start time, so a recycled pid is never taken for the same process."""

    pid: int
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces); None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def identity_of(pid: int) -> ProcessIdentity | None:
    fields = _stat_fields(pid)
    return ProcessIdentity(pid, int(fields[19])) if fields else None


def is_alive(process: ProcessIdentity) -> bool:
    fields = _stat_fields(process.pid)
    if fields is None or fields[0] == "Z":  # a zombie has exited; only its exit status waits
        return False
    return int(fields[19]) == process.start_ticks


def descendants_of(root_pid: int) -> set[ProcessIdentity]:
    """Every live process below root_pid, whatever process group or session it moved to."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[ProcessIdentity] = set()
    pending = list(children.get(root_pid, []))
    while pending:
        pid = pending.pop()
        if (identity := identity_of(pid)) is not None:
            found.add(identity)
        pending.extend(children.get(pid, []))
    return found


def process_group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Launcher:
    """`python -m tools.stack` in a process group of its own, its output kept in files."""

    def __init__(self, env: dict[str, str], output_dir: Path, name: str):
        self.env = env
        self.stdout_path = output_dir / f"{name}.stdout"
        self.stderr_path = output_dir / f"{name}.stderr"
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        # Filled while it runs: after it exits, /proc no longer says who its children were.
        self.seen_descendants: set[ProcessIdentity] = set()

    def start(self) -> Launcher:
        self.stdout_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tools.stack"],
                env=self.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def output(self) -> str:
        stderr = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"--- {self.name} stdout ---\n{self.stdout()}\n--- {self.name} stderr ---\n{stderr}"

    async def wait_ready(self, timeout: float) -> float:
        """Seconds until the ready banner; fails if the launcher exits or takes too long."""
        started = time.monotonic()
        while READY_BANNER not in self.stdout():
            self.remember_descendants()  # so that cleanup finds them even if start-up fails
            if self.process.poll() is not None:
                pytest.fail(f"the launcher exited with {self.process.returncode} before it was ready")
            if time.monotonic() - started > timeout:
                pytest.fail(f"no {READY_BANNER!r} on the launcher's stdout within {timeout:g} s")
            await asyncio.sleep(0.1)
        self.remember_descendants()
        return time.monotonic() - started

    def remember_descendants(self) -> None:
        self.seen_descendants |= descendants_of(self.pid)

    async def stop(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM, as `kill` or a supervisor would send it; (exit code or None, seconds)."""
        self.remember_descendants()
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        while self.process.poll() is None and time.monotonic() - started < timeout:
            await asyncio.sleep(0.05)
        return self.process.poll(), time.monotonic() - started

    def survivors(self) -> list[str]:
        """What the launcher started and is still running, with its command line."""
        alive = [process for process in self.seen_descendants if is_alive(process)]
        return [f"{process.pid}: {_command_line(process.pid)}" for process in sorted(alive, key=lambda p: p.pid)]

    def kill_everything(self) -> None:
        """Cleanup after a failed test: nothing of this launcher may outlive it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.remember_descendants()
        for process in self.seen_descendants:
            if is_alive(process):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)  # each server leads its own group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(process.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def stack_env(database_url: str, tmp_path: Path) -> dict[str, str]:
    """Everything the launcher reads, pointing at this test's database and free ports."""
    no_aws_file = str(tmp_path / "no-aws-config")  # a developer's ~/.aws must not change the run
    return {
        **{name: os.environ[name] for name in INHERITED_VARIABLES if name in os.environ},
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen")]),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": database_url,
        "NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "STACK_S3_PORT": str(free_port()),
        "STORY_ADDR": f"127.0.0.1:{free_port()}",
        "IMAGE_ADDR": f"127.0.0.1:{free_port()}",
        "CREDITS_ADDR": f"127.0.0.1:{free_port()}",
        **{f"{name.upper()}_METRICS_ADDR": f"127.0.0.1:{free_port()}" for name in ("story", "image", "credits")},
        "CASEFILE_RUN_DIR": str(tmp_path / "run"),
        "AWS_CONFIG_FILE": no_aws_file,
        "AWS_SHARED_CREDENTIALS_FILE": no_aws_file,
    }


@pytest.fixture
def launchers(stack_env: dict[str, str], tmp_path: Path) -> Iterator[list[Launcher]]:
    """The launchers a test started; their output is printed (shown on failure), then
    anything of theirs still running is killed."""
    started: list[Launcher] = []
    try:
        yield started
    finally:
        for launcher in started:
            launcher.kill_everything()
        for launcher in started:
            print(launcher.output())
        for log_path in sorted((Path(stack_env["CASEFILE_RUN_DIR"]) / "logs").glob("*.log")):
            print(f"--- {log_path.name} (last 60 lines) ---")
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-60:]))


# ---------------------------------------------------------------------------- calls


async def watch_until_final(story_addr: str, story_id: str) -> list[story_pb.Story]:
    """WatchStory's states of one story, until the stream ends at a final portrait status."""
    seen: list[story_pb.Story] = []
    async with grpc.aio.insecure_channel(story_addr, options=FAST_RECONNECT) as channel:
        stub = story_service_pb2_grpc.StoryServiceStub(channel)
        call = stub.WatchStory(
            story_pb.WatchStoryRequest(story_id=story_id), metadata=GATEWAY, timeout=PORTRAIT_TIMEOUT_S
        )
        async for reply in call:
            seen.append(reply.story)
            if reply.story.portrait_status in FINAL_STATUSES:
                break
    return seen


async def fetch_portrait(image_addr: str, storage_id: str) -> tuple[str, httpx.Response]:
    """The URL GetImageUrl hands out for a storage id, and what an HTTP GET of it answers."""
    async with grpc.aio.insecure_channel(image_addr, options=FAST_RECONNECT) as channel:
        reply = await image_service_pb2_grpc.ImageServiceStub(channel).GetImageUrl(
            image_service_pb2.GetImageUrlRequest(storage_id=storage_id), metadata=GATEWAY, timeout=CALL_TIMEOUT_S
        )
    async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S) as http:
        return reply.url, await http.get(reply.url)


def assert_png(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC, f"not a PNG: {data[:16]!r}"
    with Image.open(io.BytesIO(data)) as picture:
        picture.load()  # decodes every byte: a truncated file fails here
        assert picture.format == "PNG"
        return picture.size


async def stop_and_check_nothing_survives(launcher: Launcher) -> None:
    exit_code, seconds = await launcher.stop(STOP_TIMEOUT_S)
    outcome = "did not exit" if exit_code is None else f"exited {exit_code}"
    assert exit_code == 0, f"the launcher {outcome} within {STOP_TIMEOUT_S:g} s of SIGTERM"
    # nats-server, rclone and the three services, at least.
    assert len(launcher.seen_descendants) >= 5, f"expected the launcher's children, saw {launcher.seen_descendants}"
    await asyncio.sleep(0.2)  # an orphan killed at the very end may still be dying
    assert launcher.survivors() == [], "processes outlived the launcher"
    assert not process_group_exists(launcher.pid), "the launcher's process group still has members"
    print(f"{launcher.name}: stopped in {seconds:.1f} s")


# ---------------------------------------------------------------------------- the test


async def test_make_run_serves_a_story_with_its_portrait_and_keeps_both_across_restarts(
    stack_env: dict[str, str], launchers: list[Launcher], tmp_path: Path
):
    first = Launcher(stack_env, tmp_path / "output", "first-run").start()
    launchers.append(first)
    first_ready_s = await first.wait_ready(FIRST_START_TIMEOUT_S)
    banner = first.stdout()
    assert stack_env["STORY_ADDR"] in banner and stack_env["NATS_URL"] in banner
    assert "authorization: Bearer dev-gateway" in banner

    async with grpc.aio.insecure_channel(stack_env["STORY_ADDR"], options=FAST_RECONNECT) as channel:
        generated = await story_service_pb2_grpc.StoryServiceStub(channel).GenerateStory(
            story_pb.GenerateStoryRequest(user_id="u1"), metadata=GATEWAY, timeout=CALL_TIMEOUT_S
        )
    story = generated.story
    assert story.story_id and story.user_id == "u1" and story.chapters and story.image_generation_prompt

    states = await watch_until_final(stack_env["STORY_ADDR"], story.story_id)
    final = states[-1]
    assert final.portrait_status == story_pb.PORTRAIT_STATUS_READY, f"portrait ended {final}"
    assert final.storage_id == f"portraits/{story.story_id}/1.png"

    url, response = await fetch_portrait(stack_env["IMAGE_ADDR"], final.storage_id)
    assert response.status_code == 200, f"GET {url} answered {response.status_code}: {response.text[:300]}"
    portrait = response.content
    assert_png(portrait)
    # rclone keeps each object as a plain file: that is why `make run` keeps portraits.
    on_disk = Path(stack_env["CASEFILE_RUN_DIR"]) / "s3" / "casefile" / final.storage_id
    assert on_disk.read_bytes() == portrait

    async with grpc.aio.insecure_channel(stack_env["CREDITS_ADDR"], options=FAST_RECONNECT) as channel:
        account = (
            await credits_service_pb2_grpc.CreditsServiceStub(channel).GetAccount(
                credits_service_pb2.GetAccountRequest(user_id="u1"), metadata=GATEWAY, timeout=CALL_TIMEOUT_S
            )
        ).account
    assert account.user_id == "u1" and account.balance > 0
    await check_metrics(stack_env, banner, story.story_id)
    check_pipeline_logs(Path(stack_env["CASEFILE_RUN_DIR"]) / "logs", story.story_id)

    await stop_and_check_nothing_survives(first)

    second = Launcher(stack_env, tmp_path / "output", "second-run").start()
    launchers.append(second)
    second_ready_s = await second.wait_ready(SECOND_START_TIMEOUT_S)

    async with grpc.aio.insecure_channel(stack_env["STORY_ADDR"], options=FAST_RECONNECT) as channel:
        kept = (
            await story_service_pb2_grpc.StoryServiceStub(channel).GetStory(
                story_pb.GetStoryRequest(story_id=story.story_id), metadata=GATEWAY, timeout=CALL_TIMEOUT_S
            )
        ).story
    assert kept.portrait_status == story_pb.PORTRAIT_STATUS_READY
    assert kept.storage_id == final.storage_id
    url, response = await fetch_portrait(stack_env["IMAGE_ADDR"], kept.storage_id)
    assert response.status_code == 200, f"GET {url} answered {response.status_code} after the restart"
    assert response.content == portrait

    await stop_and_check_nothing_survives(second)
    print(f"ready after {first_ready_s:.1f} s, then {second_ready_s:.1f} s on the second start")


# ---------------------------------------------------------------------------- metrics and logs


async def check_metrics(env: dict[str, str], banner: str, story_id: str) -> None:
    """Each service serves its own endpoint, the banner says where, and the metrics move."""
    urls = {name: f"http://{env[f'{name.upper()}_METRICS_ADDR']}/metrics" for name in ("story", "image", "credits")}
    for url in urls.values():
        assert url in banner
    story_before = await scrape(urls["story"])
    get_story = {"grpc_service": "casefile.story.v1.StoryService", "grpc_method": "GetStory", "grpc_code": "OK"}
    async with grpc.aio.insecure_channel(env["STORY_ADDR"], options=FAST_RECONNECT) as channel:
        await story_service_pb2_grpc.StoryServiceStub(channel).GetStory(
            story_pb.GetStoryRequest(story_id=story_id), metadata=GATEWAY, timeout=CALL_TIMEOUT_S
        )
    story, image, credits = [await scrape(url) for url in urls.values()]

    assert story.value("grpc_server_handled_total", **get_story) == story_before.value("grpc_server_handled_total", **get_story) + 1
    assert story.value("grpc_server_handled_total", grpc_method="GenerateStory", grpc_code="OK") >= 1
    assert story.value("grpc_server_handling_seconds_count", grpc_method="GetStory") >= 1
    assert story.value("casefile_outbox_published_total", outbox="story.outbox") >= 1
    assert story.value("casefile_outbox_publish_lag_seconds_count", outbox="story.outbox") >= 1
    assert story.has("casefile_outbox_backlog", outbox="story.outbox")
    assert image.value("casefile_portraits_finished_total", outcome="READY") >= 1
    assert image.value("casefile_portrait_step_seconds_count", step="upload", outcome="ok") >= 1
    assert image.value("casefile_provider_call_seconds_count", kind="image", provider="local", outcome="ok") >= 1
    assert image.value("casefile_consumer_deliveries_total", consumer="image-portraits", verdict="ack") >= 1
    assert image.has("casefile_consumer_pending_messages", consumer="image-portraits")
    assert image.value("grpc_server_handled_total", grpc_method="GetImageUrl", grpc_code="OK") >= 1
    assert credits.value("casefile_ledger_entries_total", kind="GRANT") >= 1  # the welcome grant
    assert credits.value("casefile_ledger_amount_hundredths_total", kind="GRANT") > 0
    assert credits.value("grpc_server_handled_total", grpc_method="GetAccount", grpc_code="OK") >= 1


# The picture goes straight to S3 once the provider answers: "keep" (into the database)
# happens only when that upload fails.
# "mark_stored" happens only when the attach fails (the picture is in S3, the story not told yet).
PIPELINE_STEPS = ["write", "publish", "read_story", "claim", "generate", "upload", "attach"]


def check_pipeline_logs(log_dir: Path, story_id: str) -> None:
    """Every step of the story's portrait pipeline logged its end as one JSON line with the
    keys an operator greps for, across the story and image services."""
    lines = []
    for name in ("story", "image"):
        for raw in (log_dir / f"{name}.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    steps = [line for line in lines if line.get("story_id") == story_id and "step" in line]
    ended = [line for line in steps if line["event"].endswith((".step_succeeded", ".step_failed"))]

    assert all({"event", "story_id", "attempt", "step", "duration_ms", "error"} <= line.keys() for line in steps)
    assert [line["step"] for line in ended] == PIPELINE_STEPS, [line["event"] for line in ended]
    assert all(line["event"].endswith(".step_succeeded") and line["error"] is None for line in ended)
    assert all(line["attempt"] == 1 and line["duration_ms"] >= 0 for line in ended)
    assert {line["event"].split(".")[0] for line in ended} == {"story", "outbox", "portrait"}
