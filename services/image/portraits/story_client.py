"""The story service as the portrait pipeline sees it: three calls, errors in domain terms."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from casefile.story.v1 import story_service_pb2, story_service_pb2_grpc
from services.image.errors import DependencyUnavailable
from services.image.portraits.domain import StoryGone, StoryMovedOn, StoryRejected, StoryStatus, StoryView
from shared.auth import bearer_metadata
from shared.grpc_errors import details_of

# Codes that mean the request itself can never succeed; anything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, a wrong token an operator can fix, ...) is worth a later delivery.
_REJECTED_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})
_TO_PROTO = {
    StoryStatus.FAILED: story_service_pb2.PORTRAIT_STATUS_FAILED,
    StoryStatus.SKIPPED: story_service_pb2.PORTRAIT_STATUS_SKIPPED,
}
_FROM_PROTO = {
    story_service_pb2.PORTRAIT_STATUS_PENDING: StoryStatus.PENDING,
    story_service_pb2.PORTRAIT_STATUS_READY: StoryStatus.READY,
    story_service_pb2.PORTRAIT_STATUS_FAILED: StoryStatus.FAILED,
    story_service_pb2.PORTRAIT_STATUS_SKIPPED: StoryStatus.SKIPPED,
}


class StoryClient:
    def __init__(self, stub: story_service_pb2_grpc.StoryServiceStub, token: str, *, timeout: float = 10) -> None:
        self._stub = stub
        self._metadata = bearer_metadata(token)
        self.timeout = timeout

    def __repr__(self) -> str:
        return "StoryClient()"

    async def get_story(self, story_id: str) -> StoryView:
        request = story_service_pb2.GetStoryRequest(story_id=story_id)
        story = (await self._call(self._stub.GetStory, request)).story
        return StoryView(
            story_id=story.story_id,
            prompt=story.image_generation_prompt,
            attempt=story.portrait_attempt or 1,
            status=_FROM_PROTO.get(story.portrait_status, StoryStatus.PENDING),
            storage_id=story.storage_id,
        )

    async def set_story_image(self, story_id: str, storage_id: str, attempt: int) -> None:
        request = story_service_pb2.SetStoryImageRequest(story_id=story_id, storage_id=storage_id, attempt=attempt)
        await self._call(self._stub.SetStoryImage, request)

    async def set_portrait_status(self, story_id: str, status: StoryStatus, reason: str, attempt: int) -> None:
        request = story_service_pb2.SetPortraitStatusRequest(
            story_id=story_id, status=_TO_PROTO[status], reason=reason, attempt=attempt
        )
        await self._call(self._stub.SetPortraitStatus, request)

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Message) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            message = f"story {code.name}: {error.details()}"
            if code == grpc.StatusCode.NOT_FOUND:
                raise StoryGone(message) from error
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise StoryMovedOn(message, reason=details_of(error).reason) from error
            if code in _REJECTED_CODES:
                raise StoryRejected(message) from error
            raise DependencyUnavailable(message) from error
