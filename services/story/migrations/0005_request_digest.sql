-- What a request_id was first sent with: GenerateStory's theme or CreateStory's case file,
-- as a digest (services/story/domain.py, request_digest). A repeat of the request_id with
-- other arguments is refused instead of answered with a story it did not ask for. Rows
-- made before this column have NULL, and their repeats are answered as before.
ALTER TABLE story.stories ADD COLUMN request_digest text;
