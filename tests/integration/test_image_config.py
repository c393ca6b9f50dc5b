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
        ({"S3_ENDPOINT_URL": "nonsense"}, "S3_ENDPOINT_URL"),
        ({"S3_PUBLIC_ENDPOINT_URL": "ftp://files.example"}, "S3_PUBLIC_ENDPOINT_URL"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_variable(overrides, variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AUTH_TOKENS": TOKENS, **overrides})

    assert caught.value.name == variable
    assert "t-gateway" not in str(caught.value)


def test_provider_settings_default_to_the_vendors_documented_urls_and_no_keys():
    providers = Config.from_env({"AUTH_TOKENS": TOKENS}).providers

    assert providers.configured() == ()
    assert providers.openai.base_url == "https://api.openai.com/v1"
    assert providers.openrouter.base_url == "https://openrouter.ai/api/v1"
    assert providers.gemini.base_url == "https://generativelanguage.googleapis.com/v1beta"
    assert providers.stability.base_url == "https://api.stability.ai"
    assert providers.recraft.base_url == "https://external.api.recraft.ai/v1"
    assert (providers.breaker_failure_threshold, providers.breaker_cool_down_seconds) == (5, 30)


def test_provider_keys_are_secrets_and_gemini_takes_either_name():
    env = {"AUTH_TOKENS": TOKENS, "OPENAI_API_KEY": "sk-one", "GOOGLE_API_KEY": "g-two", "STABILITY_API_KEY": "st-3",
           "OPENROUTER_BASE_URL": "http://127.0.0.1:8080/api/v1/"}  # fmt: skip
    config = Config.from_env(env)

    assert config.providers.configured() == ("openai", "gemini", "stability")
    assert config.providers.gemini.api_key.reveal() == "g-two"
    assert config.providers.openrouter.base_url == "http://127.0.0.1:8080/api/v1"
    for secret in ("sk-one", "g-two", "st-3"):
        assert secret not in repr(config)
    both = Config.from_env({**env, "GEMINI_API_KEY": "g-one"})
    assert both.providers.gemini.api_key.reveal() == "g-one"


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"OPENAI_BASE_URL": "api.openai.com/v1"}, "OPENAI_BASE_URL"),
        ({"GEMINI_BASE_URL": "ftp://example.com"}, "GEMINI_BASE_URL"),
        ({"STABILITY_BASE_URL": "http://host:port"}, "STABILITY_BASE_URL"),
        ({"PROVIDER_BREAKER_FAILURES": "0"}, "PROVIDER_BREAKER_FAILURES"),
        ({"PROVIDER_BREAKER_COOL_DOWN_SECONDS": "never"}, "PROVIDER_BREAKER_COOL_DOWN_SECONDS"),
    ],
)
def test_bad_provider_settings_stop_start_up_naming_the_variable(overrides, variable):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AUTH_TOKENS": TOKENS, **overrides})
    assert caught.value.name == variable
