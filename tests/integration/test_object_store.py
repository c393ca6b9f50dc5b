"""ObjectStore.put_new against moto's S3 server: keys are never overwritten, with or without
the HEAD that comes first."""

from __future__ import annotations

import aiobotocore.session
import pytest

from services.image.objects import ObjectStore, s3_client_config
from tests.fakes.s3_requests import requests_to


@pytest.fixture
async def store(s3_endpoint_url, s3_bucket):
    session = aiobotocore.session.get_session()
    config = s3_client_config(custom_endpoint=True, plain_http=True)
    async with session.create_client("s3", endpoint_url=s3_endpoint_url, region_name="us-east-1", config=config) as client:
        yield ObjectStore(client, s3_bucket, region="us-east-1")


async def test_put_new_known_absent_skips_the_head_and_still_never_overwrites(store, s3_server, s3_bucket):
    assert await store.put_new("portraits/a.png", b"first", "image/png", known_absent=True)
    assert requests_to(s3_server.log_path, s3_bucket, "portraits/a.png", method="HEAD") == []

    # Told wrongly that the key is free: If-None-Match on the PUT refuses it all the same.
    assert not await store.put_new("portraits/a.png", b"second", "image/png", known_absent=True)
    assert await store.get("portraits/a.png") == b"first"


async def test_put_new_checks_first_by_default(store, s3_server, s3_bucket):
    assert await store.put_new("portraits/b.png", b"first", "image/png")
    assert not await store.put_new("portraits/b.png", b"second", "image/png")
    assert len(requests_to(s3_server.log_path, s3_bucket, "portraits/b.png", method="HEAD")) == 2
    assert len(requests_to(s3_server.log_path, s3_bucket, "portraits/b.png")) == 1
    assert await store.get("portraits/b.png") == b"first"


def test_checksums_are_left_to_sigv4_over_plain_http_only():
    # Over http the signature already hashes the body; over TLS the CRC32 is what spares it.
    assert s3_client_config(custom_endpoint=True, plain_http=True).request_checksum_calculation == "when_required"
    assert s3_client_config(custom_endpoint=False).request_checksum_calculation == "when_supported"
