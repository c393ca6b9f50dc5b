-- The image editor's jobs (issue 9): edit chains, canvases, the mask of an inpaint.

-- A chain is the jobs linked by parent_job_id. root_job_id is its first job (a job with no
-- parent is its own root) and chain_depth how many parents lie between a job and its root,
-- so ListGenerationJobs can list a whole chain with one index and a create can refuse a
-- chain deeper than 50 without walking it. Rows written before this migration get theirs here.
ALTER TABLE image.jobs
    ADD COLUMN root_job_id uuid,
    ADD COLUMN chain_depth integer NOT NULL DEFAULT 0 CHECK (chain_depth BETWEEN 0 AND 50),
    -- EDIT with INPAINT: the caller's PNG mask (at most 4 MB, checked before the charge);
    -- read by the worker only, never with the row.
    ADD COLUMN mask bytea CHECK (mask IS NULL OR length(mask) <= 4194304),
    ADD CONSTRAINT jobs_edit_operation_known CHECK (edit_operation IS NULL OR edit_operation IN (
        'inpaint', 'outpaint', 'variation', 'remove_background', 'restyle')),
    ADD CONSTRAINT jobs_edits_name_their_operation CHECK ((kind = 'EDIT') = (edit_operation IS NOT NULL));

WITH RECURSIVE chain AS (
    SELECT job_id, job_id AS root, 0 AS depth FROM image.jobs WHERE parent_job_id IS NULL
    UNION ALL
    SELECT j.job_id, chain.root, chain.depth + 1
      FROM image.jobs j JOIN chain ON j.parent_job_id = chain.job_id
     WHERE chain.depth < 50)
UPDATE image.jobs j SET root_job_id = chain.root, chain_depth = chain.depth FROM chain WHERE j.job_id = chain.job_id;

-- ListGenerationJobs by chain, project and canvas: always the user's own jobs, newest first.
CREATE INDEX jobs_by_root ON image.jobs (root_job_id, create_time DESC, job_id DESC) WHERE root_job_id IS NOT NULL;
CREATE INDEX jobs_by_user_project ON image.jobs (user_id, project_id, create_time DESC, job_id DESC)
    WHERE project_id IS NOT NULL;
CREATE INDEX jobs_by_user_canvas ON image.jobs (user_id, canvas_id, create_time DESC, job_id DESC)
    WHERE canvas_id IS NOT NULL;
