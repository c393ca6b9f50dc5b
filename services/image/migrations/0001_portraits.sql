-- One row per portrait attempt of a story (attempt 1, then +1 per RetryPortrait), so that
-- a redelivered story.created event finds what was already done and does not do it twice.
CREATE TABLE image.portraits (
    story_id uuid NOT NULL,
    attempt integer NOT NULL CHECK (attempt >= 1),
    -- PENDING: nothing stored yet. STORED: the object is in S3 but the story has not
    -- confirmed it. READY, SKIPPED, FAILED: final, and the story has been told.
    status text NOT NULL DEFAULT 'PENDING'
        CHECK (status IN ('PENDING', 'STORED', 'READY', 'SKIPPED', 'FAILED')),
    storage_id text,
    error text,
    deliveries integer NOT NULL DEFAULT 0 CHECK (deliveries >= 0),
    -- A worker holds the attempt until lease_until; two deliveries of the same event
    -- (two processes, or a duplicate publish) must not paint at the same time.
    lease_owner uuid,
    lease_until timestamptz,
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (story_id, attempt)
);
