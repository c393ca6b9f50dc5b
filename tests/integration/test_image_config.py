"""services.image.config: defaults from CONTRACT.md, and start-up errors that name the variable."""

from __future__ import annotations

import pytest

from services.image.config import Config
from shared.config import ConfigError

TOKENS = "gateway:t-gateway,image:t-image"


def test_defaults_follow_the_operations_contract():
    config = Config.from_env({"AUTH_TOKENS": TOKENS, "RECRAFT_API_KEY": "rk-secret"})

    assert config.listen_addr == "127.0.0.1:50052"
    assert config.story_addr == "127.0.0.1:50051"
    assert config.database_url.reveal() == "postgresql://postgres@127.0.0.1:5432/casefile"
    assert (config.nats.url, config.s3_bucket, config.s3_region) == ("nats://127.0.0.1:4222", "casefile", "us-east-1")
    assert config.s3_endpoint_url is None and config.s3_public_endpoint_url is None
    assert (config.portrait_provider, config.allow_private_downloads) == ("local", False)
    # Portraits wait on the provider's network, so many fit in one process; the consumer's
    # max_ack_pending is far above processes x concurrency.
    assert (config.portrait_concurrency, config.portrait_max_deliver) == (16, 8)
    assert config.portrait_max_ack_pending == 1000
    assert config.nats_stream_replicas == 1
    assert config.portrait_redelivery_backoff_seconds == (2, 5, 15, 30, 60, 120, 300)
    assert config.portrait_attempt_budget_seconds == 60
    assert config.portrait_ack_wait_seconds == 15
    assert config.outgoing_token.reveal() == "t-image"
    assert "rk-secret" not in repr(config) and "t-image" not in repr(config)


def test_ack_wait_is_read_from_the_environment():
    config = Config.from_env({"AUTH_TOKENS": TOKENS, "PORTRAIT_ACK_WAIT_SECONDS": "3"})

    assert config.portrait_ack_wait_seconds == 3


def test_region_falls_back_to_aws_default_region():
    config = Config.from_env({"AUTH_TOKENS": TOKENS, "AWS_DEFAULT_REGION": "eu-west-1"})

    assert config.s3_region == "eu-west-1"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"AUTH_TOKENS": ""}, "AUTH_TOKENS"),
        ({"AUTH_TOKENS": "gateway:t-gateway"}, "IMAGE_TOKEN"),  # no token to call story with
        ({"PORTRAIT_PROVIDER": "dall-e"}, "PORTRAIT_PROVIDER"),
        ({"PORTRAIT_REDELIVERY_BACKOFF_SECONDS": "2,soon"}, "PORTRAIT_REDELIVERY_BACKOFF_SECONDS"),
        ({"PORTRAIT_REDELIVERY_BACKOFF_SECONDS": "2,0"}, "PORTRAIT_REDELIVERY_BACKOFF_SECONDS"),
        ({"PORTRAIT_CONCURRENCY": "0"}, "PORTRAIT_CONCURRENCY"),
        ({"PORTRAIT_MAX_DELIVER": "many"}, "PORTRAIT_MAX_DELIVER"),
        ({"PORTRAIT_ACK_WAIT_SECONDS": "0.5"}, "PORTRAIT_ACK_WAIT_SECONDS"),  # below the 1 s minimum
        ({"PORTRAIT_ACK_WAIT_SECONDS": "soon"}, "PORTRAIT_ACK_WAIT_SECONDS"),
        ({"ALLOW_PRIVATE_DOWNLOADS": "perhaps"}, "ALLOW_PRIVATE_DOWNLOADS"),
        ({"IMAGE_ADDR": "50052"}, "IMAGE_ADDR"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_variable(overrides, variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AUTH_TOKENS": TOKENS, **overrides})

    assert caught.value.name == variable
    assert "t-gateway" not in str(caught.value)
