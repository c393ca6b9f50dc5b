"""Story portraits: story.created in, a picture in S3 attached to the story out.

messaging.py  the story.created consumer and the dead-letter consumer (wiring of the
              shared durable consumer)
domain.py     the pipeline: read the story, claim the attempt, generate, keep, upload, attach
storage.py    the image.portraits rows (state and lease of each attempt) and kept results
story_client.py  the three StoryService calls the pipeline makes
"""
