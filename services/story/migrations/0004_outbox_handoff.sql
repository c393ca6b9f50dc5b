-- The handoff (shared/outbox.py): the story service inserts its own events already claimed
-- and publishes them itself right after the commit. Waking every relay for those would only
-- make each run a claim that finds nothing, so the insert trigger now wakes the relays only
-- for rows that nobody claimed (a writer that does not hand off, a bulk load).
DROP TRIGGER outbox_inserted ON story.outbox;

CREATE OR REPLACE FUNCTION story.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM inserted WHERE claimed_until IS NULL) THEN
        PERFORM pg_notify('story_outbox', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_inserted AFTER INSERT ON story.outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION story.notify_outbox();
