-- The outbox becomes the shape shared/outbox.py relays: the event's bytes are written with
-- the story (so the relay needs no join and no knowledge of stories), rows are claimed for
-- a while instead of locked across a publish, and commits wake the relays at once.
ALTER TABLE story.outbox
    ADD COLUMN payload bytea,
    ADD COLUMN claimed_until timestamptz;

CREATE INDEX outbox_published_at ON story.outbox (published_at) WHERE published_at IS NOT NULL;

CREATE FUNCTION story.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('story_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_inserted AFTER INSERT ON story.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION story.notify_outbox();

-- WatchStory: every change of a story wakes the one listener of each story process.
CREATE FUNCTION story.notify_story_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('story_changes', NEW.story_id::text);
    RETURN NULL;
END $$;

CREATE TRIGGER story_changed AFTER UPDATE ON story.stories
    FOR EACH ROW WHEN (OLD.update_time IS DISTINCT FROM NEW.update_time)
    EXECUTE FUNCTION story.notify_story_change();
