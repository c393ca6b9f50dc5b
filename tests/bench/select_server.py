"""The parts under GetStory and nothing else: a bare grpc.aio server whose one method runs
the story service's own SELECT of one story over an asyncpg pool and answers with a fixed
payload of the same size as a GetStoryResponse.

No auth, no validation, no domain objects, no protobuf building: its ratio to the bare echo
is what gRPC plus one indexed SELECT allow on this machine, the ceiling for GetStory.
"""

from __future__ import annotations

import sys

import asyncpg
import grpc
import uvloop

from casefile.story.v1 import story_service_pb2 as pb
from services.story.storage import GET_STORY_SQL

SERVICE = "bench.Select"
METHOD = f"/{SERVICE}/GetStory"


async def _no_reset(conn: asyncpg.Connection) -> None:
    """As the story service's pool: nothing sent on release."""


async def serve(port: int, database_url: str, payload_size: int) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=10, max_size=10, reset=_no_reset)
    payload = b"x" * payload_size

    async def get_story(request: pb.GetStoryRequest, context: grpc.aio.ServicerContext) -> bytes:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(GET_STORY_SQL, request.story_id)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such story")
        return payload

    handler = grpc.unary_unary_rpc_method_handler(get_story, request_deserializer=pb.GetStoryRequest.FromString)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"GetStory": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    # On the event loop the services run on (shared.grpc_server.serve_main), so the ceiling
    # has the same parts underneath as the service it bounds.
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
