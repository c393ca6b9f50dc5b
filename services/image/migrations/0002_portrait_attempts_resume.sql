-- A generated portrait is kept as soon as it exists (GENERATED), so that an upload or a
-- story call failing afterwards never makes a redelivery pay the provider again: the
-- redelivery resumes from the first step not done yet.
ALTER TABLE image.portraits DROP CONSTRAINT portraits_status_check;
ALTER TABLE image.portraits ADD CONSTRAINT portraits_status_check
    CHECK (status IN ('PENDING', 'GENERATED', 'STORED', 'READY', 'SKIPPED', 'FAILED'));

-- The PNG of a GENERATED attempt until it is in S3; deleted once STORED.
CREATE TABLE image.portrait_results (
    story_id uuid NOT NULL,
    attempt integer NOT NULL,
    png bytea NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (story_id, attempt),
    FOREIGN KEY (story_id, attempt) REFERENCES image.portraits (story_id, attempt) ON DELETE CASCADE
);
