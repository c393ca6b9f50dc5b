"""The ImageService gRPC servicer: request -> one domain call -> response."""

from __future__ import annotations

import logging

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from services.image import image_urls
from services.image.errors import DependencyUnavailable
from services.image.catalog import EditOperation, Quality
from services.image.routing import ProviderRouter, ServedModel
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
    def __init__(self, objects: image_urls.SignedObjects, models: ProviderRouter | None = None) -> None:
        self._objects = objects
        self._models = models

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
        if self._models is None:
            await _not_implemented(context, "ListModels")
        served = self._models.served_models()
        return image_service_pb2.ListModelsResponse(models=[model_proto(model) for model in served])

    async def DeleteImage(self, request, context):
        await _not_implemented(context, "DeleteImage")

    async def GetJobStats(self, request, context):
        await _not_implemented(context, "GetJobStats")


QUALITY_PROTO = {
    Quality.STANDARD: image_service_pb2.QUALITY_STANDARD,
    Quality.HD: image_service_pb2.QUALITY_HD,
    Quality.LOW: image_service_pb2.QUALITY_LOW,
    Quality.MEDIUM: image_service_pb2.QUALITY_MEDIUM,
    Quality.HIGH: image_service_pb2.QUALITY_HIGH,
}
EDIT_OPERATION_PROTO = {
    EditOperation.INPAINT: image_service_pb2.EDIT_OPERATION_INPAINT,
    EditOperation.OUTPAINT: image_service_pb2.EDIT_OPERATION_OUTPAINT,
    EditOperation.VARIATION: image_service_pb2.EDIT_OPERATION_VARIATION,
    EditOperation.REMOVE_BACKGROUND: image_service_pb2.EDIT_OPERATION_REMOVE_BACKGROUND,
    EditOperation.RESTYLE: image_service_pb2.EDIT_OPERATION_RESTYLE,
}


def model_proto(served: ServedModel) -> image_service_pb2.Model:
    spec = served.spec
    return image_service_pb2.Model(
        id=spec.id,
        provider=str(served.provider),
        credits_per_image=spec.units_per_image,
        sizes=[image_service_pb2.ImageSize(width=width, height=height) for width, height in spec.sizes],
        min_side=spec.min_side,
        max_side=spec.max_side,
        supports_edit=spec.supports_edit,
        max_images_per_call=spec.max_images_per_call,
        supports_stream=spec.supports_stream,
        # Listed in the enum's order, so the answer is the same on every call.
        edit_operations=sorted(EDIT_OPERATION_PROTO[operation] for operation in spec.edit_operations),
        quality_prices=[
            image_service_pb2.QualityPrice(quality=QUALITY_PROTO[quality], credits_per_image=units)
            for quality, units in spec.quality_units.items()
        ],
        default_quality=QUALITY_PROTO.get(spec.default_quality, image_service_pb2.QUALITY_UNSPECIFIED),
        max_prompt_chars=spec.max_prompt_chars,
        providers=[str(provider) for provider in served.providers],
    )
