-- Stories and the transactional outbox that turns each committed story into one
-- `story.created` event.

CREATE TABLE story.stories (
    story_id                uuid PRIMARY KEY,
    user_id                 text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    -- The caller's idempotency key; NULL when none was given (NULLs never conflict).
    request_id              text,
    title                   text NOT NULL,
    patient                 jsonb NOT NULL,
    chapters                jsonb NOT NULL,
    image_generation_prompt text NOT NULL,
    -- The S3 object key of the portrait once READY.
    storage_id              text,
    portrait_status         text NOT NULL DEFAULT 'PENDING'
        CHECK (portrait_status IN ('PENDING', 'READY', 'FAILED', 'SKIPPED')),
    portrait_error          text NOT NULL DEFAULT '',
    -- 1 for the first portrait; RetryPortrait adds one, so each attempt gets its own event.
    portrait_attempt        integer NOT NULL DEFAULT 1,
    create_time             timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time             timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT stories_request_unique UNIQUE (user_id, request_id),
    CONSTRAINT ready_has_storage CHECK (portrait_status <> 'READY' OR storage_id IS NOT NULL)
);

CREATE INDEX stories_by_user ON story.stories (user_id, create_time DESC, story_id DESC);

CREATE TABLE story.outbox (
    outbox_id        bigserial PRIMARY KEY,
    story_id         uuid NOT NULL REFERENCES story.stories (story_id),
    portrait_attempt integer NOT NULL,
    subject          text NOT NULL,
    -- Sent as Nats-Msg-Id: JetStream drops a second publish of the same id.
    msg_id           text NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at     timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text
);

-- The relay only ever looks for what is still to publish.
CREATE INDEX outbox_unpublished ON story.outbox (outbox_id) WHERE published_at IS NULL;
