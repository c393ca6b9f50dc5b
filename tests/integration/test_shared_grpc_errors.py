"""Rich errors over a real grpc.aio server: what the server puts in, the client reads back."""

import grpc
import pytest

from shared.grpc_errors import ErrorTable, Refusal, abort, details_of, invalid_argument
from shared.grpc_server import ServiceSpec, start_grpc_server

SERVICE = "casefile.test.v1.RefuseService"


class Problem(Exception):
    pass


class FieldProblem(Problem):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class BalanceTooLow(Problem):
    def __init__(self, balance: int, cost: int) -> None:
        super().__init__(f"balance {balance} is below the cost {cost}")
        self.metadata = {"balance": str(balance), "cost": str(cost)}


class SlowDown(Problem):
    retry_after_seconds = 1.25


class StoryNotFound(Problem):
    pass


class Unmapped(Exception):
    pass


TABLE = ErrorTable(
    "test.casefile",
    {
        FieldProblem: (grpc.StatusCode.INVALID_ARGUMENT, None),
        BalanceTooLow: (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS"),
        SlowDown: (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
        Problem: (grpc.StatusCode.NOT_FOUND, None),
    },
)

ERRORS = {
    b"field": FieldProblem("content.chapters[1].text", "must not be empty"),
    b"balance": BalanceTooLow(50, 100),
    b"slow": SlowDown("too many charges; try again in 1.25 s"),
    b"missing": StoryNotFound("no such story"),
    b"bug": Unmapped("a bug with a secret inside"),
}


def register(server: grpc.aio.Server) -> None:
    async def refuse(request: bytes, context) -> bytes:
        if request == b"edge":
            await abort(context, invalid_argument("status", "must be FAILED or SKIPPED"))
        if request == b"long":
            await abort(context, Refusal(grpc.StatusCode.UNAVAILABLE, "x" * 10_000, retry_after_seconds=2))
        await TABLE.abort(context, ERRORS[request])
        return b""

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Refuse": grpc.unary_unary_rpc_method_handler(refuse)})
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def call():
    running = await start_grpc_server(listen_addr="127.0.0.1:0", services=[ServiceSpec(SERVICE, register)])
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")

    async def refused(payload: bytes):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{SERVICE}/Refuse")(payload, timeout=5)
        return details_of(caught.value)

    yield refused
    await channel.close()
    await running.stop(0)


async def test_invalid_argument_carries_the_field_violation(call):
    details = await call(b"field")
    assert details.code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.message == "content.chapters[1].text: must not be empty"
    assert details.violations == (("content.chapters[1].text", "must not be empty"),)
    assert details.reason == ""


async def test_failed_precondition_carries_reason_domain_and_metadata(call):
    details = await call(b"balance")
    assert details.code is grpc.StatusCode.FAILED_PRECONDITION
    assert (details.reason, details.domain) == ("INSUFFICIENT_CREDITS", "test.casefile")
    assert details.metadata == {"balance": "50", "cost": "100"}
    assert details.retry_after_seconds is None


async def test_retry_info_carries_the_delay(call):
    details = await call(b"slow")
    assert details.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "RATE_LIMITED"
    assert details.retry_after_seconds == pytest.approx(1.25)


async def test_subclass_inherits_the_entry_and_gets_a_reason_from_its_name(call):
    details = await call(b"missing")
    assert details.code is grpc.StatusCode.NOT_FOUND
    assert details.reason == "STORY_NOT_FOUND"


async def test_an_unmapped_error_is_internal_and_leaks_nothing(call):
    details = await call(b"bug")
    assert details.code is grpc.StatusCode.INTERNAL
    assert "secret" not in details.message


async def test_edge_refusal_and_a_long_message_is_cut(call):
    edge = await call(b"edge")
    assert edge.fields == ("status",)
    long = await call(b"long")
    assert long.code is grpc.StatusCode.UNAVAILABLE
    assert len(long.message) <= 2000
    assert long.retry_after_seconds == 2


def test_details_of_an_error_without_trailers_is_just_code_and_message():
    class Bare(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "down"

        def trailing_metadata(self):
            return (("grpc-status-details-bin", b"\xff not a status"),)

    details = details_of(Bare())
    assert (details.code, details.message, details.violations) == (grpc.StatusCode.UNAVAILABLE, "down", ())
