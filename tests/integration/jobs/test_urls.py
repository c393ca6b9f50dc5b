"""Players' images behind signed URLs: presigned S3 URLs checked by a real SigV4 server
(`rclone serve s3`), and CloudFront signed URLs checked against the key pair's public key."""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from casefile.image.v1 import image_service_pb2 as pb
from tools.infra import RcloneS3Server

from .helpers import serve_jobs

pytestmark = pytest.mark.timeout(60)

ACCESS_KEY, SECRET_KEY = "jobs-url-key", "jobs-url-secret"


@pytest.fixture
def rclone(tmp_path, aws_credentials, monkeypatch):
    server = RcloneS3Server(tmp_path / "s3", access_key=ACCESS_KEY, secret_key=SECRET_KEY).start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    try:
        yield server
    finally:
        server.stop()


async def test_a_players_image_url_opens_and_a_tampered_one_is_refused(rclone, database_url, nats_server, auth_tokens):
    async with serve_jobs(database_url=database_url, nats_url=nats_server.url, s3_endpoint_url=rclone.endpoint_url,
                          s3_bucket="casefile", tokens=auth_tokens) as stack:  # fmt: skip
        job = await stack.final((await stack.create("u1", width=80, height=80)).job.job_id)
        image = job.images[0]
        url = (await stack.call("GetImageUrl", pb.GetImageUrlRequest(storage_id=image.storage_id, user_id="u1"))).url
        async with httpx.AsyncClient() as http:
            good = await http.get(url)
            other_slot = await http.get(url.replace("/0.png?", "/1.png?"))
            head, _, signature = url.partition("X-Amz-Signature=")
            tampered = await http.get(f"{head}X-Amz-Signature={'0' if signature[0] != '0' else '1'}{signature[1:]}")
    assert good.status_code == 200 and good.content.startswith(b"\x89PNG") and len(good.content) == image.size_bytes
    assert other_slot.status_code == 403 and tampered.status_code == 403


def _key_pair() -> tuple[str, rsa.RSAPublicKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode(), key.public_key()


def _cloudfront_b64decode(text: str) -> bytes:
    # CloudFront's URL-safe base64: + becomes -, = becomes _, / becomes ~.
    return base64.b64decode(text.replace("-", "+").replace("_", "=").replace("~", "/"))


async def test_with_cloudfront_the_url_is_signed_for_the_key_pair(serve):
    pem, public_key = _key_pair()
    cdn = {"CLOUDFRONT_DOMAIN": "d111111abcdef8.cloudfront.net", "CLOUDFRONT_KEY_PAIR_ID": "K2JCJMDEHXQW5F",
           "CLOUDFRONT_PRIVATE_KEY": pem.replace("\n", "\\n")}  # fmt: skip
    async with serve(**cdn) as stack:
        job = await stack.final((await stack.create("u1")).job.job_id)
        image = job.images[0]
        answer = await stack.call("GetImageUrl", pb.GetImageUrlRequest(storage_id=image.storage_id, user_id="u1",
                                                                         expires_in_seconds=600))  # fmt: skip
    parts = urlsplit(answer.url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    resource = f"https://d111111abcdef8.cloudfront.net/{image.storage_id}"
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == resource
    assert query["Key-Pair-Id"] == "K2JCJMDEHXQW5F"
    assert abs(int(query["Expires"]) - answer.expire_time.seconds) <= 1
    # The canned policy CloudFront rebuilds from the URL and checks the signature against.
    policy = json.dumps(
        {"Statement": [{"Resource": resource, "Condition": {"DateLessThan": {"AWS:EpochTime": int(query["Expires"])}}}]},
        separators=(",", ":"),
    ).encode()
    signature = _cloudfront_b64decode(query["Signature"])
    public_key.verify(signature, policy, padding.PKCS1v15(), hashes.SHA1())  # raises InvalidSignature if not
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(Exception, match="InvalidSignature|^$"):
        other.verify(signature, policy, padding.PKCS1v15(), hashes.SHA1())
