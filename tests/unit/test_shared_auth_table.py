from shared.auth import allow, bearer_metadata, current_caller


def test_allow_builds_full_method_names():
    table = allow(
        "casefile.story.v1.StoryService",
        {"GetStory": ["gateway", "admin"], "SetStoryImage": ("image",)},
    )
    assert table == {
        "/casefile.story.v1.StoryService/GetStory": frozenset({"gateway", "admin"}),
        "/casefile.story.v1.StoryService/SetStoryImage": frozenset({"image"}),
    }


def test_bearer_metadata():
    assert bearer_metadata("abc") == (("authorization", "Bearer abc"),)


def test_current_caller_is_none_outside_a_call():
    assert current_caller() is None
