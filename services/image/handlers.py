"""The ImageService gRPC servicer: request -> one domain call -> response."""

from __future__ import annotations

import logging

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from services.image import image_urls
from services.image.errors import DependencyUnavailable
from shared.auth import allow, current_caller
from shared.grpc_errors import ErrorTable

log = logging.getLogger(__name__)

SERVICE_NAME = "casefile.image.v1.ImageService"

# The one place where domain errors become status codes and stable ErrorInfo reasons.
ERRORS = ErrorTable(
    "image.casefile",
    {
        image_urls.InvalidField: (grpc.StatusCode.INVALID_ARGUMENT, None),
        image_urls.ImageNotFound: (grpc.StatusCode.NOT_FOUND, "IMAGE_NOT_FOUND"),
        DependencyUnavailable: (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"),
    },
)
_REFUSALS = (image_urls.UrlError, DependencyUnavailable)

_PLAYER_FACING = ("gateway", "admin")
# Who may call what, as in CONTRACT.md's "who may call" column.
ALLOWED_CALLERS = allow(
    SERVICE_NAME,
    {
        "CreateGenerationJob": _PLAYER_FACING,
        "GetGenerationJob": _PLAYER_FACING,
        "ListGenerationJobs": _PLAYER_FACING,
        "WatchGenerationJob": _PLAYER_FACING,
        "CancelGenerationJob": _PLAYER_FACING,
        "ListModels": _PLAYER_FACING,
        "GetImageUrl": (*_PLAYER_FACING, "story"),
        "DeleteImage": _PLAYER_FACING,
        "GetJobStats": _PLAYER_FACING,
    },
)


async def _abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    log.info("rpc.refused", extra={"method": method, "caller": current_caller(), "error": str(error)})
    await ERRORS.abort(context, error)


async def _not_implemented(context: grpc.aio.ServicerContext, method: str) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(self, objects: image_urls.SignedObjects) -> None:
        self._objects = objects

    async def GetImageUrl(self, request, context):
        try:
            signed = await image_urls.image_url(
                self._objects,
                storage_id=request.storage_id,
                user_id=request.user_id,
                expires_in_seconds=request.expires_in_seconds,
            )
        except _REFUSALS as error:
            await _abort_with(context, "GetImageUrl", error)
        expire_time = Timestamp()
        expire_time.FromDatetime(signed.expire_time)
        return image_service_pb2.GetImageUrlResponse(url=signed.url, expire_time=expire_time)

    async def CreateGenerationJob(self, request, context):
        await _not_implemented(context, "CreateGenerationJob")

    async def GetGenerationJob(self, request, context):
        await _not_implemented(context, "GetGenerationJob")

    async def ListGenerationJobs(self, request, context):
        await _not_implemented(context, "ListGenerationJobs")

    async def WatchGenerationJob(self, request, context):
        await _not_implemented(context, "WatchGenerationJob")

    async def CancelGenerationJob(self, request, context):
        await _not_implemented(context, "CancelGenerationJob")

    async def ListModels(self, request, context):
        await _not_implemented(context, "ListModels")

    async def DeleteImage(self, request, context):
        await _not_implemented(context, "DeleteImage")

    async def GetJobStats(self, request, context):
        await _not_implemented(context, "GetJobStats")
