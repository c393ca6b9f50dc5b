"""gRPC edge of the story service: proto in, one domain call, proto out."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

import asyncpg
import grpc

from casefile.story.v1 import story_service_pb2 as pb
from casefile.story.v1 import story_service_pb2_grpc
from services.story import domain
from services.story.writers.base import StoryWriter
from shared.auth import allow, current_caller
from shared.grpc_errors import ErrorTable
from shared.proto_time import to_timestamp

log = logging.getLogger(__name__)

SERVICE_NAME = "casefile.story.v1.StoryService"

ALLOWED_CALLERS = allow(
    SERVICE_NAME,
    {
        "GenerateStory": ["gateway", "admin"],
        "CreateStory": ["gateway", "admin"],
        "GetStory": ["gateway", "admin", "image"],
        "ListStories": ["gateway", "admin"],
        "WatchStory": ["gateway", "admin"],
        "SetStoryImage": ["image"],
        "SetPortraitStatus": ["image"],
        "RetryPortrait": ["admin"],
    },
)

# The one place where domain errors become status codes and stable ErrorInfo reasons.
ERRORS = ErrorTable(
    "story.casefile",
    {
        domain.InvalidField: (grpc.StatusCode.INVALID_ARGUMENT, None),
        domain.StoryNotFound: (grpc.StatusCode.NOT_FOUND, "STORY_NOT_FOUND"),
        domain.StaleAttempt: (grpc.StatusCode.FAILED_PRECONDITION, "STALE_ATTEMPT"),
        domain.PortraitAlreadyFinal: (grpc.StatusCode.FAILED_PRECONDITION, "PORTRAIT_ALREADY_FINAL"),
        domain.PortraitAlreadyReady: (grpc.StatusCode.FAILED_PRECONDITION, "PORTRAIT_ALREADY_READY"),
        domain.PortraitInProgress: (grpc.StatusCode.FAILED_PRECONDITION, "PORTRAIT_IN_PROGRESS"),
        domain.TooManyWatchers: (grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_WATCHERS"),
        domain.WriterUnavailable: (grpc.StatusCode.UNAVAILABLE, "WRITER_UNAVAILABLE"),
        domain.StoreUnavailable: (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"),
    },
)

PORTRAIT_STATUS_TO_PROTO = {
    domain.PortraitStatus.PENDING: pb.PORTRAIT_STATUS_PENDING,
    domain.PortraitStatus.READY: pb.PORTRAIT_STATUS_READY,
    domain.PortraitStatus.FAILED: pb.PORTRAIT_STATUS_FAILED,
    domain.PortraitStatus.SKIPPED: pb.PORTRAIT_STATUS_SKIPPED,
}
PORTRAIT_STATUS_FROM_PROTO = {value: key for key, value in PORTRAIT_STATUS_TO_PROTO.items()}
GENDER_TO_PROTO = {
    None: pb.GENDER_UNSPECIFIED,
    domain.Gender.FEMALE: pb.GENDER_FEMALE,
    domain.Gender.MALE: pb.GENDER_MALE,
    domain.Gender.OTHER: pb.GENDER_OTHER,
}
GENDER_FROM_PROTO = {value: key for key, value in GENDER_TO_PROTO.items()}

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def _abort_on_domain_error(method: Handler) -> Handler:
    @wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except domain.DomainError as error:
            await _refuse(context, method.__name__, error)
        except asyncpg.PostgresError as error:
            # Validation happens before SQL, so this is our fault, never the caller's; the
            # transaction rolled back, so nothing was half-written.
            log.error("story.database_failed", extra={"method": method.__name__, "error": repr(error)})
            await context.abort(grpc.StatusCode.INTERNAL, "the story could not be stored; nothing was written")

    return wrapper  # type: ignore[return-value]


async def _refuse(context: grpc.aio.ServicerContext, method: str, error: domain.DomainError) -> None:
    log.info("rpc.refused", extra={"method": method, "caller": current_caller(), "error": str(error)})
    await ERRORS.abort(context, error)




def story_to_proto(story: domain.Story) -> pb.Story:
    content = story.content
    patient = content.patient
    assert patient is not None, "stored stories always have a patient"
    authorship = story.authorship
    return pb.Story(
        story_id=story.story_id,
        user_id=story.user_id,
        title=content.title,
        patient=pb.Patient(
            name=patient.name,
            age=patient.age,
            diagnosis=patient.diagnosis,
            appearance=patient.appearance,
            gender=GENDER_TO_PROTO[patient.gender],
            admission_date=patient.admission_date.isoformat() if patient.admission_date else "",
        ),
        chapters=[pb.Chapter(title=c.title, text=c.text) for c in content.chapters],
        image_generation_prompt=content.image_generation_prompt,
        storage_id=story.storage_id,
        portrait_status=PORTRAIT_STATUS_TO_PROTO[story.portrait_status],
        portrait_error=story.portrait_error,
        create_time=to_timestamp(story.create_time),
        update_time=to_timestamp(story.update_time),
        portrait_attempt=story.portrait_attempt,
        typing_difficulty=story.typing_difficulty,
        theme=authorship.theme,
        writer=authorship.writer,
        writer_model=authorship.model,
    )


class StoryProtos:
    """The pb.Story of each story read lately, by the Story object itself: the reads hand
    out the same frozen Story while its row is unchanged (storage.DecodedStories), so a
    polled story's proto is built once instead of on every call. Callers get a copy (a
    response's story field copies it), never the kept message."""

    def __init__(self, max_stories: int = 1024) -> None:
        self._max_stories = max_stories
        # id(story) -> (story, its proto); the story is kept so its id is not reused.
        self._known: OrderedDict[int, tuple[domain.Story, pb.Story]] = OrderedDict()

    def of(self, story: domain.Story) -> pb.Story:
        known = self._known.get(id(story))
        if known is not None and known[0] is story:
            self._known.move_to_end(id(story))
            return known[1]
        proto = story_to_proto(story)
        self._known[id(story)] = (story, proto)
        self._known.move_to_end(id(story))
        if len(self._known) > self._max_stories:
            self._known.popitem(last=False)
        return proto


def content_from_proto(request: pb.CreateStoryRequest) -> domain.StoryContent:
    content = request.content
    return domain.StoryContent(
        title=content.title,
        patient=_patient_from_proto(content.patient) if content.HasField("patient") else None,
        chapters=tuple(domain.Chapter(title=c.title, text=c.text) for c in content.chapters),
        image_generation_prompt=content.image_generation_prompt,
    )


def _patient_from_proto(patient: pb.Patient) -> domain.Patient:
    if patient.gender not in GENDER_FROM_PROTO:
        raise domain.InvalidField("content.patient.gender", f"is not a Gender value ({patient.gender})")
    admitted = patient.admission_date
    return domain.Patient(
        name=patient.name,
        age=patient.age,
        diagnosis=patient.diagnosis,
        appearance=patient.appearance,
        gender=GENDER_FROM_PROTO[patient.gender],
        admission_date=domain.parse_admission_date(admitted, "content.patient.admission_date") if admitted else None,
    )


class StoryServicer(story_service_pb2_grpc.StoryServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        writer: StoryWriter,
        *,
        events: domain.EventHandoff,
        changes: domain.StoryChanges,
        watch_limits: domain.WatchLimits | None = None,
    ) -> None:
        self._pool = pool
        self._reads = domain.story_reads(pool)
        self._protos = StoryProtos()
        self._writer = writer
        self._events = events
        self._changes = changes
        self._watch_limits = watch_limits or domain.WatchLimits()
        self._generating = domain.RequestsInProgress()

    @_abort_on_domain_error
    async def GenerateStory(self, request: pb.GenerateStoryRequest, context: grpc.aio.ServicerContext) -> pb.GenerateStoryResponse:
        story = await domain.generate_story(
            self._pool,
            self._writer,
            user_id=request.user_id,
            theme=request.theme,
            request_id=request.request_id,
            events=self._events,
            in_progress=self._generating,
        )
        return pb.GenerateStoryResponse(story=story_to_proto(story))

    @_abort_on_domain_error
    async def CreateStory(self, request: pb.CreateStoryRequest, context: grpc.aio.ServicerContext) -> pb.CreateStoryResponse:
        if not request.HasField("content"):
            raise domain.InvalidField("content", "is required")
        story = await domain.create_story(
            self._pool,
            user_id=request.user_id,
            content=content_from_proto(request),
            request_id=request.request_id,
            events=self._events,
        )
        return pb.CreateStoryResponse(story=story_to_proto(story))

    @_abort_on_domain_error
    async def GetStory(self, request: pb.GetStoryRequest, context: grpc.aio.ServicerContext) -> pb.GetStoryResponse:
        story = await domain.get_story(self._reads, request.story_id)
        return pb.GetStoryResponse(story=self._protos.of(story))

    @_abort_on_domain_error
    async def ListStories(self, request: pb.ListStoriesRequest, context: grpc.aio.ServicerContext) -> pb.ListStoriesResponse:
        page = await domain.list_stories(
            self._pool, user_id=request.user_id, page_size=request.page_size, page_token=request.page_token
        )
        return pb.ListStoriesResponse(
            stories=[story_to_proto(story) for story in page.stories], next_page_token=page.next_page_token
        )

    async def WatchStory(
        self, request: pb.WatchStoryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchStoryResponse]:
        try:
            async for story in domain.watch_story(
                self._reads, self._changes, story_id=request.story_id, limits=self._watch_limits
            ):
                yield pb.WatchStoryResponse(story=self._protos.of(story))
        except domain.DomainError as error:
            await _refuse(context, "WatchStory", error)
        except asyncpg.PostgresError as error:
            log.error("story.database_failed", extra={"method": "WatchStory", "error": repr(error)})
            await ERRORS.abort(context, domain.StoreUnavailable("the story database failed; watch again"))

    @_abort_on_domain_error
    async def SetStoryImage(self, request: pb.SetStoryImageRequest, context: grpc.aio.ServicerContext) -> pb.SetStoryImageResponse:
        story = await domain.set_story_image(
            self._pool, story_id=request.story_id, storage_id=request.storage_id, attempt=request.attempt
        )
        return pb.SetStoryImageResponse(story=story_to_proto(story))

    @_abort_on_domain_error
    async def SetPortraitStatus(
        self, request: pb.SetPortraitStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetPortraitStatusResponse:
        story = await domain.set_portrait_status(
            self._pool,
            story_id=request.story_id,
            status=PORTRAIT_STATUS_FROM_PROTO.get(request.status),
            reason=request.reason,
            attempt=request.attempt,
        )
        return pb.SetPortraitStatusResponse(story=story_to_proto(story))

    @_abort_on_domain_error
    async def RetryPortrait(self, request: pb.RetryPortraitRequest, context: grpc.aio.ServicerContext) -> pb.RetryPortraitResponse:
        story = await domain.retry_portrait(self._pool, story_id=request.story_id, events=self._events)
        return pb.RetryPortraitResponse(story=story_to_proto(story))
