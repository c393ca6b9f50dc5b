"""Every JetStream stream casefile uses, declared in this one place.

The story service publishes into STORY_EVENTS and the image service consumes it; both call
`shared.nats.ensure_stream` with these specs, so neither can drift from the other, and an
existing stream is never reset (see ensure_stream). The number of replicas comes from
NATS_STREAM_REPLICAS at start-up.
"""

from __future__ import annotations

from shared.nats import StreamSpec

STORY_CREATED_SUBJECT = "story.created"
# Within this window JetStream drops a second publish of the same Nats-Msg-Id; the outbox
# relays' claims expire well inside it, so a relay that died after publishing is deduped.
DUPLICATE_WINDOW_SECONDS = 120
WEEK_SECONDS = 7 * 24 * 3600

STORY_EVENTS = StreamSpec(
    name="STORY_EVENTS",
    subjects=(STORY_CREATED_SUBJECT,),
    max_age_seconds=WEEK_SECONDS,
    duplicate_window_seconds=DUPLICATE_WINDOW_SECONDS,
)


def max_deliveries_subject(stream: str, durable: str) -> str:
    """Where JetStream announces a message of `durable` that ran out of deliveries."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"


# The durable consumer through which every image process paints portraits.
PORTRAITS_DURABLE = "image-portraits"

# Keeps JetStream's "ran out of deliveries" advisories for the portraits consumer, which
# the server only announces once: stored here, they reach an image process even if none
# was running at that moment, so an abandoned portrait still ends FAILED.
PORTRAIT_DEAD_LETTERS = StreamSpec(
    name="PORTRAIT_DEAD_LETTERS",
    subjects=(max_deliveries_subject(STORY_EVENTS.name, PORTRAITS_DURABLE),),
    max_age_seconds=WEEK_SECONDS,
    duplicate_window_seconds=DUPLICATE_WINDOW_SECONDS,
)


# Generation jobs: the image service queues each job through its outbox, and every image
# process takes jobs from one durable consumer. `image.job.completed` announces a job at
# its final status (published from the same outbox).
JOB_QUEUED_SUBJECT = "image.job.queued"
JOB_COMPLETED_SUBJECT = "image.job.completed"
IMAGE_JOBS = StreamSpec(
    name="IMAGE_JOBS",
    subjects=(JOB_QUEUED_SUBJECT, JOB_COMPLETED_SUBJECT),
    max_age_seconds=WEEK_SECONDS,
    duplicate_window_seconds=DUPLICATE_WINDOW_SECONDS,
)
JOBS_DURABLE = "image-jobs"
