"""What the generation jobs tell Prometheus: how jobs end, each step's latency, refunds."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

JOBS_CREATED = Counter(
    "casefile_jobs_created_total",
    "CreateGenerationJob calls by what came of them (created, replayed, or the refusal's reason).",
    ["outcome"],
)
JOBS_FINISHED = Counter(
    "casefile_jobs_finished_total",
    "Generation jobs that reached a final status through a worker, by status (COMPLETED, FAILED); "
    "cancellations are counted in casefile_jobs_cancelled_total.",
    ["outcome"],
)
JOBS_CANCELLED = Counter("casefile_jobs_cancelled_total", "Generation jobs cancelled by their user.")
JOB_DELIVERIES = Counter(
    "casefile_job_deliveries_total",
    "image.job.queued deliveries handled, by what came of each (COMPLETED, FAILED, CANCELLED, ABANDONED, "
    "CHARGING, BUSY, PROVIDER_RETRY, SETTLE_RETRY, LEASE_LOST, UNKNOWN_JOB, retry, terminated).",
    ["outcome"],
)
JOB_REFUNDS = Counter(
    "casefile_job_refunds_total",
    "Refunds the credits service took for generation jobs: images not delivered (image) and charges "
    "of creates that never came back (abandoned).",
    ["kind"],
)
JOB_REFUNDED_UNITS = Counter(
    "casefile_job_refunded_units_total",
    "Hundredths of a credit given back for generation jobs, by kind (image, abandoned).",
    ["kind"],
)
JOB_STEP_SECONDS = Histogram(
    "casefile_job_step_seconds",
    "One step of a generation job (generate, keep, reserve_storage, upload, mark_delivered, settle), "
    "by whether it succeeded.",
    ["step", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 240),
)


def observe_step(step: str, ok: bool, seconds: float) -> None:
    JOB_STEP_SECONDS.labels(step, "ok" if ok else "error").observe(seconds)


def count_refund(kind: str, units: int) -> None:
    JOB_REFUNDS.labels(kind).inc()
    JOB_REFUNDED_UNITS.labels(kind).inc(units)
