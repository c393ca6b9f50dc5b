"""The ImageService gRPC servicer: request -> one domain call -> response."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import grpc

from casefile.image.v1 import image_service_pb2 as pb
from casefile.image.v1 import image_service_pb2_grpc
from services.image import image_urls
from services.image.errors import DependencyUnavailable
from services.image.jobs import domain as jobs
from services.image.jobs import wire
from services.image.jobs.wire import EDIT_OPERATION_PROTO, JOB_STATUS_PROTO, QUALITY_PROTO
from services.image.jobs.domain import JobStatus
from services.image.routing import ProviderRouter, ServedModel
from shared.auth import allow, current_caller
from shared.grpc_errors import ErrorTable
from shared.proto_time import to_timestamp

log = logging.getLogger(__name__)

SERVICE_NAME = "casefile.image.v1.ImageService"
_CODE = grpc.StatusCode

# The one place where domain errors become status codes and stable ErrorInfo reasons.
ERRORS = ErrorTable(
    "image.casefile",
    {
        image_urls.InvalidField: (_CODE.INVALID_ARGUMENT, None),
        image_urls.ImageNotFound: (_CODE.NOT_FOUND, "IMAGE_NOT_FOUND"),
        jobs.InvalidJobRequest: (_CODE.INVALID_ARGUMENT, None),
        jobs.RequestIdReused: (_CODE.INVALID_ARGUMENT, "REQUEST_ID_REUSED"),
        jobs.JobNotFound: (_CODE.NOT_FOUND, "JOB_NOT_FOUND"),
        jobs.ImageNotFound: (_CODE.NOT_FOUND, "IMAGE_NOT_FOUND"),
        jobs.JobAlreadyFinished: (_CODE.FAILED_PRECONDITION, "JOB_ALREADY_FINISHED"),
        jobs.InsufficientCredits: (_CODE.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"),
        jobs.StorageQuotaExceeded: (_CODE.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED"),
        jobs.ChargeRateLimited: (_CODE.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        jobs.TooManyWatchers: (_CODE.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS"),
        DependencyUnavailable: (_CODE.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE"),
    },
)
_REFUSALS = (image_urls.UrlError, jobs.JobError, DependencyUnavailable)

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

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


async def _abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    log.info("rpc.refused", extra={"method": method, "caller": current_caller(), "error": str(error)})
    await ERRORS.abort(context, error)


def _refusing_errors(method: Handler) -> Handler:
    """Refusals leave as their table's status; anything else is logged and INTERNAL, never UNKNOWN."""

    @wraps(method)
    async def handle(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except _REFUSALS as error:
            await _abort_with(context, method.__name__, error)
        except Exception as error:
            log.exception("rpc.handler_failed", extra={"method": method.__name__, "error": repr(error)})
            await ERRORS.abort(context, error)

    return handle  # type: ignore[return-value]


class ImageServicer(image_service_pb2_grpc.ImageServiceServicer):
    def __init__(
        self,
        objects: image_urls.SignedObjects,
        models: ProviderRouter,
        jobs_deps: jobs.JobDeps | None,
        changes: jobs.JobChanges | None,
    ) -> None:
        self._objects = objects
        self._models = models
        self._jobs = jobs_deps
        self._changes = changes

    @_refusing_errors
    async def GetImageUrl(self, request, context):
        async def owns(user_id: str, storage_id: str) -> bool:
            return await jobs.user_owns_image(self._jobs, user_id=user_id, storage_id=storage_id)

        signed = await image_urls.image_url(
            self._objects,
            storage_id=request.storage_id,
            user_id=request.user_id,
            expires_in_seconds=request.expires_in_seconds,
            owns=owns,
        )
        return pb.GetImageUrlResponse(url=signed.url, expire_time=to_timestamp(signed.expire_time))

    @_refusing_errors
    async def CreateGenerationJob(self, request, context):
        created = await jobs.create_job(self._jobs, job_request_from_proto(request))
        if created.replayed:
            context.set_trailing_metadata((("idempotent-replayed", "true"),))
        return pb.CreateGenerationJobResponse(
            job=job_to_proto(created.job),
            credits_used=created.job.row.credits_charged,
            credits_remaining=created.credits_remaining,
        )

    @_refusing_errors
    async def GetGenerationJob(self, request, context):
        job = await jobs.get_job(self._jobs, job_id=request.job_id, user_id=request.user_id)
        return pb.GetGenerationJobResponse(job=job_to_proto(job))

    @_refusing_errors
    async def ListGenerationJobs(self, request, context):
        page = await jobs.list_jobs(
            self._jobs, user_id=request.user_id, status=_status_filter(request.status), page_size=request.page_size,
            page_token=request.page_token, project_id=request.project_id, canvas_id=request.canvas_id,
            root_job_id=request.root_job_id,
        )  # fmt: skip
        return pb.ListGenerationJobsResponse(jobs=[job_to_proto(job) for job in page.jobs], next_page_token=page.next_page_token)

    async def WatchGenerationJob(self, request, context) -> AsyncIterator[pb.WatchGenerationJobResponse]:
        try:
            async for item in jobs.watch_job(self._jobs, self._changes, job_id=request.job_id, user_id=request.user_id):
                if isinstance(item, jobs.PreviewFrame):
                    yield pb.WatchGenerationJobResponse(preview=pb.JobPreview.FromString(item.payload))
                else:
                    yield pb.WatchGenerationJobResponse(job=job_to_proto(item))
        except _REFUSALS as error:
            await _abort_with(context, "WatchGenerationJob", error)
        except Exception as error:
            log.exception("rpc.handler_failed", extra={"method": "WatchGenerationJob", "error": repr(error)})
            await ERRORS.abort(context, error)

    @_refusing_errors
    async def CancelGenerationJob(self, request, context):
        job = await jobs.cancel_job(self._jobs, job_id=request.job_id, user_id=request.user_id)
        return pb.CancelGenerationJobResponse(job=job_to_proto(job))

    @_refusing_errors
    async def ListModels(self, request, context):
        served = self._models.served_models()
        return pb.ListModelsResponse(models=[model_proto(model) for model in served])

    @_refusing_errors
    async def DeleteImage(self, request, context):
        await jobs.delete_image(self._jobs, image_id=request.image_id, user_id=request.user_id)
        return pb.DeleteImageResponse()

    @_refusing_errors
    async def GetJobStats(self, request, context):
        stats = await jobs.job_stats(self._jobs, user_id=request.user_id, project_id=request.project_id,
                                     every_owner=current_caller() == "admin")  # fmt: skip
        return pb.GetJobStatsResponse(
            counts=[pb.StatusCount(status=JOB_STATUS_PROTO[status], count=count) for status, count in stats.counts.items()],
            total_jobs=stats.total,
            success_rate=stats.success_rate,
            credits_charged=stats.credits_charged,
            credits_refunded=stats.credits_refunded,
            average_processing_time_ms=stats.average_processing_time_ms,
            provider_cost_micros=stats.provider_cost_microdollars,
        )


_STATUS_FROM_PROTO = {number: status for status, number in JOB_STATUS_PROTO.items()}
_QUALITY_FROM_PROTO = {number: quality for quality, number in QUALITY_PROTO.items()}
_EDIT_OPERATION_FROM_PROTO = {number: operation for operation, number in EDIT_OPERATION_PROTO.items()}
_KIND_FROM_PROTO = {
    pb.JOB_KIND_UNSPECIFIED: jobs.JobKind.GENERATE,
    pb.JOB_KIND_GENERATE: jobs.JobKind.GENERATE,
    pb.JOB_KIND_EDIT: jobs.JobKind.EDIT,
}


def _status_filter(number: int) -> JobStatus | None:
    if number == pb.JOB_STATUS_UNSPECIFIED:
        return None
    if number not in _STATUS_FROM_PROTO:
        raise jobs.InvalidJobRequest([("status", f"unknown status {number}")])
    return _STATUS_FROM_PROTO[number]


def job_request_from_proto(request: pb.CreateGenerationJobRequest) -> jobs.JobRequest:
    problems = []
    if request.kind not in _KIND_FROM_PROTO:
        problems.append(("kind", f"unknown kind {request.kind}"))
    quality = None
    if request.quality != pb.QUALITY_UNSPECIFIED:
        quality = _QUALITY_FROM_PROTO.get(request.quality)
        if quality is None:
            problems.append(("quality", f"unknown quality {request.quality}"))
    operation = None
    if request.edit_operation != pb.EDIT_OPERATION_UNSPECIFIED:
        operation = _EDIT_OPERATION_FROM_PROTO.get(request.edit_operation)
        if operation is None:
            problems.append(("edit_operation", f"unknown edit operation {request.edit_operation}"))
    if problems:
        raise jobs.InvalidJobRequest(problems)
    return jobs.JobRequest(
        user_id=request.user_id,
        request_id=request.request_id,
        prompt=request.prompt,
        model=request.model,
        width=request.width,
        height=request.height,
        num_images=request.num_images,
        quality=quality,
        kind=_KIND_FROM_PROTO[request.kind],
        project_id=request.project_id,
        parent_job_id=request.parent_job_id,
        source_image_id=request.source_image_id,
        edit_operation=operation,
        mask=request.mask,
        canvas_id=request.canvas_id,
        partial_images=request.partial_images,
    )


def job_to_proto(job: jobs.Job) -> pb.GenerationJob:
    return wire.job_message(job.row, job.images)


def model_proto(served: ServedModel) -> pb.Model:
    spec = served.spec
    return pb.Model(
        id=spec.id,
        provider=str(served.provider),
        credits_per_image=spec.units_per_image,
        sizes=[pb.ImageSize(width=width, height=height) for width, height in spec.sizes],
        min_side=spec.min_side,
        max_side=spec.max_side,
        supports_edit=spec.supports_edit,
        max_images_per_call=spec.max_images_per_call,
        supports_stream=spec.supports_stream,
        # Listed in the enum's order, so the answer is the same on every call.
        edit_operations=sorted(EDIT_OPERATION_PROTO[operation] for operation in spec.edit_operations),
        quality_prices=[
            pb.QualityPrice(quality=QUALITY_PROTO[quality], credits_per_image=units)
            for quality, units in spec.quality_units.items()
        ],
        default_quality=QUALITY_PROTO.get(spec.default_quality, pb.QUALITY_UNSPECIFIED),
        max_prompt_chars=spec.max_prompt_chars,
        providers=[str(provider) for provider in served.providers],
    )
