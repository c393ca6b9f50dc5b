"""RpcMetricsInterceptor's timed handlers: built once per served method, never for made-up names."""

import grpc

from casefile.story.v1 import story_service_pb2  # noqa: F401 - puts StoryService in the descriptor pool
from shared.rpc_metrics import RpcMetricsInterceptor

GET_STORY = "/casefile.story.v1.StoryService/GetStory"


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def answer(request, context):
    return b""


async def test_a_served_method_gets_one_timed_handler_until_grpc_hands_out_another():
    interceptor = RpcMetricsInterceptor()
    served = grpc.unary_unary_rpc_method_handler(answer)
    refusal = grpc.unary_unary_rpc_method_handler(answer)
    handlers = iter([served, served, refusal, served])

    async def continuation(details):
        return next(handlers)

    first = await interceptor.intercept_service(continuation, Details(GET_STORY))
    assert await interceptor.intercept_service(continuation, Details(GET_STORY)) is first
    refused = await interceptor.intercept_service(continuation, Details(GET_STORY))
    assert refused is not first
    assert await interceptor.intercept_service(continuation, Details(GET_STORY)) is not refused


async def test_made_up_method_names_are_timed_but_never_kept():
    interceptor = RpcMetricsInterceptor()
    handler = grpc.unary_unary_rpc_method_handler(answer)

    async def continuation(details):
        return handler

    for n in range(50):
        await interceptor.intercept_service(continuation, Details(f"/casefile.story.v1.StoryService/Invented{n}"))
    assert interceptor._timed == {}
