"""Jobs chained before the editor's migration (0004) get their chain's root and depth from it.

The database is migrated as far as the generation-jobs code knew (0001 to 0003), a chain of
three jobs and a lone job are written the way that code wrote them, then 0004 is applied.
"""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from services.image.main import MIGRATIONS_DIR
from shared.migrations import apply_migrations
from tests.integration.old_schema import database_migrated_up_to

OLD_MIGRATIONS = ("0001_portraits.sql", "0002_portrait_attempts_resume.sql", "0003_generation_jobs.sql")


@pytest.fixture
def old_database(postgres_admin_dsn, tmp_path):
    with database_migrated_up_to(postgres_admin_dsn, tmp_path, "image", MIGRATIONS_DIR, OLD_MIGRATIONS) as dsn:
        yield dsn


async def _old_job(conn: asyncpg.Connection, parent: uuid.UUID | None) -> uuid.UUID:
    """The columns the generation-jobs code (before 0004) inserted."""
    job_id = uuid.uuid4()
    await conn.execute(
        """INSERT INTO image.jobs (job_id, user_id, request_id, request_digest, kind, model, prompt, width, height,
                                   num_images, parent_job_id, unit_price, credits_charged, status, charge_id)
           VALUES ($1, 'u-old', $2, 'digest', 'GENERATE', 'local/sketch', 'a ward', 64, 64, 1, $3, 100, 100,
                   'COMPLETED', 'charge')""",
        job_id, job_id.hex, parent,
    )  # fmt: skip
    return job_id


async def test_old_chains_get_their_root_and_depth(old_database):
    conn = await asyncpg.connect(old_database)
    try:
        root = await _old_job(conn, None)
        child = await _old_job(conn, root)
        grandchild = await _old_job(conn, child)
        lone = await _old_job(conn, None)

        assert (await apply_migrations(conn, "image", MIGRATIONS_DIR))[0] == "0004"

        rows = {row["job_id"]: (row["root_job_id"], row["chain_depth"])
                for row in await conn.fetch("SELECT job_id, root_job_id, chain_depth FROM image.jobs")}  # fmt: skip
        assert rows == {root: (root, 0), child: (root, 1), grandchild: (root, 2), lone: (lone, 0)}
        assert await apply_migrations(conn, "image", MIGRATIONS_DIR) == []
    finally:
        await conn.close()
