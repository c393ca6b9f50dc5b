-- The jobs' NOTIFYs leave the transactions that change jobs and their outbox (issue 11).
--
-- PostgreSQL serializes the commits of transactions that NOTIFY, server-wide, through each
-- one's WAL flush: with these triggers every create and every step of a job queued behind
-- every other NOTIFYing commit (CreateGenerationJob spent three quarters of its time there,
-- a thousand jobs in flight most of theirs). The image service now sends the same
-- notifications itself just after each commit, in a statement of their own, many commits'
-- at once (shared/notices.py): `image_job_changes` with the job id after a change of a job,
-- `image_job_outbox` after a commit that made an outbox row available (a held intent's
-- message is not: the relay's poll finds it when its hold ends, as it did before).
DROP TRIGGER job_changed ON image.jobs;
DROP FUNCTION image.notify_job_change();
DROP TRIGGER job_outbox_changed ON image.job_outbox;
DROP FUNCTION image.notify_job_outbox();
