"""What the portrait pipeline tells Prometheus: how portraits end and how long each step takes."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PORTRAITS_FINISHED = Counter(
    "casefile_portraits_finished_total",
    "Portrait attempts that ended, by outcome (READY, FAILED, SKIPPED), as the story was told.",
    ["outcome"],
)
PORTRAIT_DELIVERIES = Counter(
    "casefile_portrait_deliveries_total",
    "story.created deliveries handled, by what came of each (READY, FAILED, SKIPPED, BUSY, "
    "NOT_CURRENT, ALREADY_DONE, STORY_GONE, STORY_REFUSED, LEASE_LOST, retry, terminated).",
    ["outcome"],
)
PORTRAIT_STEP_SECONDS = Histogram(
    "casefile_portrait_step_seconds",
    "One step of a portrait attempt (read_story, claim, generate, keep, upload, mark_stored, attach, "
    "report_status), by whether it succeeded.",
    ["step", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 90),
)


def observe_step(step: str, ok: bool, seconds: float) -> None:
    PORTRAIT_STEP_SECONDS.labels(step, "ok" if ok else "error").observe(seconds)
