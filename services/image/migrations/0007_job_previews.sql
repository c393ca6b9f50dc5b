-- Live previews (issue 9): how many partial images a job asked for per image, 0 to 3.
-- The previews themselves are never stored (they pass over core NATS to the watchers);
-- a row written before this migration asked for none.
ALTER TABLE image.jobs
    ADD COLUMN partial_images smallint NOT NULL DEFAULT 0 CHECK (partial_images BETWEEN 0 AND 3);
