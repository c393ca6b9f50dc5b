import pytest

from shared.config import (
    ConfigError,
    Secret,
    env_auth_tokens,
    env_bool,
    env_database_url,
    env_float,
    env_int,
    env_listen_addr,
    env_secret,
    env_str,
    parse_auth_tokens,
)


def test_env_str_returns_value_or_default():
    assert env_str({"A": " x "}, "A") == "x"
    assert env_str({}, "A", "fallback") == "fallback"
    assert env_str({"A": ""}, "A", "fallback") == "fallback"


@pytest.mark.parametrize("env", [{}, {"A": ""}, {"A": "   "}])
def test_env_str_missing_names_the_variable(env):
    with pytest.raises(ConfigError, match=r"^A: is required$"):
        env_str(env, "A")


def test_env_int_parses_and_checks_minimum():
    assert env_int({"N": "7"}, "N") == 7
    assert env_int({}, "N", 3, minimum=1) == 3
    with pytest.raises(ConfigError, match=r"^N: must be an integer, got 'seven'$"):
        env_int({"N": "seven"}, "N")
    with pytest.raises(ConfigError, match=r"^N: must be at least 1, got 0$"):
        env_int({"N": "0"}, "N", minimum=1)
    with pytest.raises(ConfigError, match=r"^N: is required$"):
        env_int({}, "N")


def test_env_float_parses_and_rejects_bad_numbers():
    assert env_float({"F": "0.5"}, "F") == 0.5
    assert env_float({}, "F", 2.0) == 2.0
    for bad in ("abc", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"^F: "):
            env_float({"F": bad}, "F")
    with pytest.raises(ConfigError, match=r"^F: must be at least 1"):
        env_float({"F": "0.1"}, "F", minimum=1)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("YES", True), ("1", True), ("false", False), ("no", False), ("0", False)],
)
def test_env_bool_words(raw, expected):
    assert env_bool({"B": raw}, "B", not expected) is expected


def test_env_bool_default_and_error():
    assert env_bool({}, "B", True) is True
    with pytest.raises(ConfigError, match=r"^B: must be true/false"):
        env_bool({"B": "maybe"}, "B", False)


@pytest.mark.parametrize("addr", ["127.0.0.1:50051", "0.0.0.0:0", "[::]:50051", "localhost:1"])
def test_env_listen_addr_accepts(addr):
    assert env_listen_addr({"ADDR": addr}, "ADDR", "x:1") == addr


@pytest.mark.parametrize("addr", ["50051", ":50051", "host:", "host:port", "host:70000", "[::1:5"])
def test_env_listen_addr_rejects(addr):
    with pytest.raises(ConfigError, match=r"^ADDR: "):
        env_listen_addr({"ADDR": addr}, "ADDR", "x:1")


def test_env_listen_addr_default():
    assert env_listen_addr({}, "ADDR", "127.0.0.1:50051") == "127.0.0.1:50051"


def test_env_database_url_accepts_both_schemes():
    for url in ("postgresql://u@h:5432/db", "postgres://u:p@h/db"):
        assert env_database_url({"DATABASE_URL": url}) == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root:hunter2@h/db", "DATABASE_URL: must be a postgresql:// URL"),
        ("postgresql://root:hunter2@h", "DATABASE_URL: must name a database"),
        ("postgresql://root:hunter2@h:notaport/db", "DATABASE_URL: is not a valid URL"),
    ],
)
def test_env_database_url_errors_never_show_the_password(url, message):
    with pytest.raises(ConfigError) as caught:
        env_database_url({"DATABASE_URL": url})
    assert str(caught.value).startswith(message)
    assert "hunter2" not in str(caught.value)


def test_parse_auth_tokens_maps_token_to_caller():
    tokens = parse_auth_tokens(" admin:tok1, gateway:tok2,gateway:tok3")
    assert dict(tokens) == {"tok1": "admin", "tok2": "gateway", "tok3": "gateway"}
    with pytest.raises(TypeError):
        tokens["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "AUTH_TOKENS: must list at least one name:token"),
        ("s3cr3t-token", "AUTH_TOKENS: entry 1 must look like name:token"),
        (":s3cr3t-token", "AUTH_TOKENS: entry 1 needs a caller name"),
        ("admin:", "AUTH_TOKENS: entry 1 (admin) has an empty token"),
        ("admin:s3cr3t-token,,gateway:t", "AUTH_TOKENS: entry 2 must look like name:token"),
        (
            "admin:s3cr3t-token,gateway:s3cr3t-token",
            "AUTH_TOKENS: entry 2 repeats the token of entry 1",
        ),
        (
            "admin:t,imgae:s3cr3t-token",
            "AUTH_TOKENS: entry 2 names caller 'imgae', which no service knows (the callers are admin, gateway, image, story)",
        ),
    ],
)
def test_parse_auth_tokens_errors_name_the_variable_but_no_token(raw, message):
    with pytest.raises(ConfigError) as caught:
        parse_auth_tokens(raw)
    assert str(caught.value).startswith(message)
    assert "s3cr3t" not in str(caught.value)


def test_env_auth_tokens_is_required_and_wrapped():
    with pytest.raises(ConfigError, match=r"^AUTH_TOKENS: is required"):
        env_auth_tokens({})
    secret = env_auth_tokens({"AUTH_TOKENS": "admin:tok1"})
    assert dict(secret.reveal()) == {"tok1": "admin"}
    assert "tok1" not in repr(secret) and "tok1" not in str(secret)


def test_secret_hides_value_in_repr_str_and_containing_dataclass():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        api_key: Secret[str]

    config = Config(api_key=Secret("sk-live-123"))
    assert repr(config.api_key) == "Secret(***)"
    assert str(config.api_key) == "Secret(***)"
    assert f"{config.api_key}" == "Secret(***)"
    assert "sk-live-123" not in repr(config)
    assert config.api_key.reveal() == "sk-live-123"


def test_env_secret_optional_and_required():
    assert env_secret({}, "RECRAFT_API_KEY") is None
    assert env_secret({"RECRAFT_API_KEY": "k"}, "RECRAFT_API_KEY").reveal() == "k"
    with pytest.raises(ConfigError, match=r"^RECRAFT_API_KEY: is required$"):
        env_secret({"RECRAFT_API_KEY": ""}, "RECRAFT_API_KEY", required=True)


def test_hashed_token_entries_are_checked():
    digest = "ab" * 32
    assert dict(parse_auth_tokens(f"image:sha256:{digest.upper()}")) == {f"sha256:{digest}": "image"}
    with pytest.raises(ConfigError, match=r"^AUTH_TOKENS: entry 1 \(image\) must be sha256: and 64 hex digits$"):
        parse_auth_tokens("image:sha256:abc")


def test_database_url_and_nats_credentials_never_show_in_a_repr():
    from services.image.config import Config as ImageConfig
    from services.story.config import Config as StoryConfig

    env = {
        "AUTH_TOKENS": "gateway:t-gateway,image:t-image",
        "DATABASE_URL": "postgresql://casefile:db-pa55word@db:5432/casefile",
        "NATS_URL": "nats://nats-user:nats-pa55word@nats:4222",
    }
    for config in (StoryConfig.from_env(env), ImageConfig.from_env(env)):
        shown = f"{config!r} {config} {config.nats} {config.database_url}"
        assert "db-pa55word" not in shown and "nats-pa55word" not in shown
        assert config.database_url.reveal() == env["DATABASE_URL"]
        assert config.nats.url == "nats://nats:4222"
        assert config.nats.connect_options() == {"user": "nats-user", "password": "nats-pa55word"}

    token_env = {**env, "NATS_URL": "nats://nats:4222", "NATS_TOKEN": "nats-t0ken"}
    config = StoryConfig.from_env(token_env)
    assert "nats-t0ken" not in repr(config)
    assert config.nats.connect_options() == {"token": "nats-t0ken"}
