"""A bare grpc.aio server answering one unary method with a fixed payload: the baseline.

It does what the story service's GetStory costs at the transport level (same payload size,
same grpc.aio runtime and uvloop, its own process) and nothing else: no auth, no database.
"""

from __future__ import annotations

import sys

import grpc
import uvloop

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Reply"


async def serve(port: int, payload_size: int) -> None:
    payload = b"x" * payload_size

    async def reply(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return payload

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Reply": grpc.unary_unary_rpc_method_handler(reply)})]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    # The services run on uvloop (shared/grpc_server.serve_main): the same loop here, so the
    # ratio compares the service's own work, not two event loops.
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
