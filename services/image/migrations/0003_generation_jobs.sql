-- Generation jobs: what players buy with credits, each image of each job, and the outbox
-- that queues them on JetStream.

-- One row per CreateGenerationJob request. The job id is derived from (user_id,
-- request_id), so every repeat of a request names the same row. The row is written as an
-- intent (CHARGING) before the credits are charged, and becomes PENDING with the charge
-- in a second transaction; an intent whose create never came back is found through its
-- queue message (held back, see job_outbox.available_at) and its charge refunded
-- (ABANDONING, then ABANDONED). Those three statuses are never shown to callers.
CREATE TABLE image.jobs (
    job_id              uuid PRIMARY KEY,
    user_id             text NOT NULL CHECK (length(user_id) BETWEEN 1 AND 128),
    request_id          text NOT NULL CHECK (length(request_id) BETWEEN 1 AND 128),
    -- A digest of every argument of the request: a repeat with other arguments is refused.
    request_digest      text NOT NULL,
    kind                text NOT NULL DEFAULT 'GENERATE' CHECK (kind IN ('GENERATE', 'EDIT')),
    model               text NOT NULL,
    prompt              text NOT NULL,
    width               integer NOT NULL CHECK (width > 0),
    height              integer NOT NULL CHECK (height > 0),
    num_images          integer NOT NULL CHECK (num_images BETWEEN 1 AND 10),
    quality             text,
    -- The editor's jobs (issue 9): what they change, chain and group by.
    source_image_id     uuid,
    edit_operation      text,
    parent_job_id       uuid,
    project_id          text,
    canvas_id           text,
    status              text NOT NULL DEFAULT 'CHARGING' CHECK (status IN (
        'CHARGING', 'ABANDONING', 'ABANDONED', 'PENDING', 'PROCESSING', 'UPLOADING', 'COMPLETED', 'FAILED', 'CANCELLED')),
    -- Hundredths of a credit per image, and for the whole job.
    unit_price          bigint NOT NULL CHECK (unit_price > 0),
    credits_charged     bigint NOT NULL CHECK (credits_charged > 0),
    -- What of the charge is given back (committed with the change that owes it).
    credits_refunded    bigint NOT NULL DEFAULT 0 CHECK (credits_refunded BETWEEN 0 AND credits_charged),
    -- 1, then +1 each time an abandoned intent is revived by a repeat of the request: each
    -- attempt charges under its own credits request_id (job:<job_id>:<attempt>).
    charge_attempt      integer NOT NULL DEFAULT 1 CHECK (charge_attempt >= 1),
    charge_id           text,
    -- The balance the charge left: CreateGenerationJob's credits_remaining, replayed as is.
    balance_after       bigint,
    retry_count         integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    error_message       text NOT NULL DEFAULT '',
    -- Who served the provider calls, and what they cost us (millionths of a dollar).
    provider            text,
    provider_cost_microdollars bigint NOT NULL DEFAULT 0 CHECK (provider_cost_microdollars >= 0),
    -- Deliveries of the job's queue message, and the worker holding the job (fencing).
    deliveries          integer NOT NULL DEFAULT 0,
    lease_owner         uuid,
    lease_until         timestamptz,
    -- The credits calls a final job owes (its refunds, RecordGeneration) are all done.
    settled             boolean NOT NULL DEFAULT false,
    create_time         timestamptz NOT NULL DEFAULT clock_timestamp(),
    update_time         timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- When a worker first took it (PROCESSING), and when it became final.
    start_time          timestamptz,
    complete_time       timestamptz,
    CONSTRAINT jobs_request_unique UNIQUE (user_id, request_id),
    CONSTRAINT charged_jobs_name_their_charge CHECK (status IN ('CHARGING', 'ABANDONING', 'ABANDONED') OR charge_id IS NOT NULL)
);

-- ListGenerationJobs: the user's jobs newest first (keyset pagination on both columns).
CREATE INDEX jobs_by_user ON image.jobs (user_id, create_time DESC, job_id DESC);
CREATE INDEX jobs_by_project ON image.jobs (project_id) WHERE project_id IS NOT NULL;

-- One row per image a job asked for (slot 0 .. num_images-1). A slot goes PENDING ->
-- GENERATED (the provider's picture kept in `png`, so a retry never pays the provider
-- again) -> DELIVERED (in S3 under storage_id, storage reserved), or FAILED; a delivered
-- image the user deletes becomes DELETED. `refund` is what the slot gives back (its price
-- when it failed for a reason that is not the user's), and `refunded` whether credits took it.
CREATE TABLE image.job_images (
    job_id          uuid NOT NULL REFERENCES image.jobs (job_id) ON DELETE CASCADE,
    slot            integer NOT NULL CHECK (slot BETWEEN 0 AND 9),
    image_id        uuid NOT NULL UNIQUE,
    status          text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'GENERATED', 'DELIVERED', 'FAILED', 'DELETING', 'DELETED')),
    png             bytea,
    content_type    text,
    size_bytes      bigint,
    width           integer,
    height          integer,
    storage_id      text UNIQUE,
    -- Set before storage is reserved for the slot: a reservation may exist from then on,
    -- so a slot that fails later replays the reservation and releases it.
    reserved_bytes  bigint,
    error           text,
    refund          bigint NOT NULL DEFAULT 0 CHECK (refund >= 0),
    refunded        boolean NOT NULL DEFAULT false,
    update_time     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job_id, slot)
);

-- The jobs' outbox, relayed to JetStream by shared/outbox.py. A row written with a job's
-- intent is held back (available_at in the future) until the charge commits the job, so
-- that a create that never came back still reaches a worker, which refunds its charge.
CREATE TABLE image.job_outbox (
    outbox_id       bigserial PRIMARY KEY,
    job_id          uuid NOT NULL,
    subject         text NOT NULL,
    msg_id          text NOT NULL UNIQUE,
    payload         bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    available_at    timestamptz,
    published_at    timestamptz,
    claimed_until   timestamptz,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text
);

CREATE INDEX job_outbox_unpublished ON image.job_outbox (outbox_id) WHERE published_at IS NULL;
CREATE INDEX job_outbox_published_at ON image.job_outbox (published_at) WHERE published_at IS NOT NULL;

CREATE FUNCTION image.notify_job_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('image_job_outbox', '');
    RETURN NULL;
END $$;

-- An insert, and the update that releases a held row, wake the relays at once.
CREATE TRIGGER job_outbox_changed AFTER INSERT OR UPDATE OF available_at ON image.job_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION image.notify_job_outbox();

-- WatchGenerationJob: every change of a job wakes the one listener of each image process.
CREATE FUNCTION image.notify_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('image_job_changes', NEW.job_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER job_changed AFTER UPDATE ON image.jobs
    FOR EACH ROW WHEN (OLD.update_time IS DISTINCT FROM NEW.update_time)
    EXECUTE FUNCTION image.notify_job_change();
