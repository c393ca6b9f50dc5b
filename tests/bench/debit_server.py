"""The parts under Charge and nothing else: a bare grpc.aio server whose one method runs the
raw debit (conditional UPDATE + ledger INSERT, one statement) over an asyncpg pool.

No auth, no validation, no idempotency record, no rate limit, no log line: what a Charge
costs beyond this is what the credits service itself adds.
"""

from __future__ import annotations

import sys

import asyncpg
import grpc
import uvloop

from casefile.credits.v1 import credits_service_pb2 as pb

SERVICE = "bench.Debit"
METHOD = f"/{SERVICE}/Charge"

_DEBIT = """
WITH debit AS (
    UPDATE credits.accounts SET balance = balance - $2, updated_at = now()
    WHERE user_id = $1 AND balance >= $2
    RETURNING balance
)
INSERT INTO credits.ledger_entries (user_id, kind, amount, balance_after, reference, request_id)
SELECT $1, 'CHARGE', -$2::bigint, balance, $3, $4 FROM debit
RETURNING entry_id::text, balance_after
"""


async def _no_reset(conn: asyncpg.Connection) -> None:
    """As the credits service's pool: nothing sent on release."""


async def serve(port: int, database_url: str, pool_size: int) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=pool_size, max_size=pool_size, reset=_no_reset)

    async def charge(request: pb.ChargeRequest, context: grpc.aio.ServicerContext) -> pb.ChargeResponse:
        async with pool.acquire() as conn:
            row = await conn.fetchrow(_DEBIT, request.user_id, request.amount, request.reference, request.request_id)
        return pb.ChargeResponse(charge_id=row[0], balance=row[1])

    handler = grpc.unary_unary_rpc_method_handler(
        charge, request_deserializer=pb.ChargeRequest.FromString, response_serializer=pb.ChargeResponse.SerializeToString
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {"Charge": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    # On the event loop the services run on (shared.grpc_server.serve_main), so the ceiling
    # has the same parts underneath as the service it bounds.
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
