"""The story service as the portrait pipeline sees it: two calls, errors in domain terms."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from casefile.story.v1 import story_service_pb2, story_service_pb2_grpc
from services.image.domain import StoryRejected, Unavailable
from shared.auth import bearer_metadata

# Codes that mean the request itself can never succeed; anything else (UNAVAILABLE,
# DEADLINE_EXCEEDED, a wrong token an operator can fix, ...) is worth a later delivery.
_PERMANENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)
_STATUSES = {
    "FAILED": story_service_pb2.PORTRAIT_STATUS_FAILED,
    "SKIPPED": story_service_pb2.PORTRAIT_STATUS_SKIPPED,
}


class StoryClient:
    def __init__(
        self, stub: story_service_pb2_grpc.StoryServiceStub, token: str, *, timeout: float = 10
    ) -> None:
        self._stub = stub
        self._metadata = bearer_metadata(token)
        self._timeout = timeout

    def __repr__(self) -> str:
        return "StoryClient()"

    async def set_story_image(self, story_id: str, storage_id: str) -> None:
        request = story_service_pb2.SetStoryImageRequest(story_id=story_id, storage_id=storage_id)
        await self._call(self._stub.SetStoryImage, request)

    async def set_portrait_status(self, story_id: str, status: str, reason: str) -> None:
        request = story_service_pb2.SetPortraitStatusRequest(
            story_id=story_id, status=_STATUSES[status], reason=reason
        )
        await self._call(self._stub.SetPortraitStatus, request)

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Message) -> None:
        try:
            await method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            message = f"story {error.code().name}: {error.details()}"
            if error.code() in _PERMANENT_CODES:
                raise StoryRejected(message) from error
            raise Unavailable(message) from error
