"""docker-compose.yml cannot run here (no Docker engine), so check what can go wrong in it:
every variable a service requires is set, nothing set is unknown to the service, and the
ports are CONTRACT.md's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("story", "image", "credits")
CONTRACT_PORTS = {"story": 50051, "image": 50052, "credits": 50053}
# Read by aiobotocore (botocore's credential chain), not by our config code.
# Knobs with defaults that are right in any deployment.
TUNABLE = re.compile(
    r"(_SECONDS|_CONCURRENCY|_MAX_DELIVER|_MAX_ACK_PENDING|_BATCH_SIZE|_MAX_WATCHERS|_REPLICAS|^ANTHROPIC_MODEL|^S3_REGION)$"
)
# ${NAME:?message}: compose refuses to start while NAME is unset; no fallback value.
REQUIRED_FROM_ENVIRONMENT = re.compile(r"^\$\{(?P<name>[A-Z_]+):\?[^}]*\}$")
# shared.config.env_nats reads these (and NATS_URL).
NATS_LOGINS = ("NATS_TOKEN", "NATS_USER", "NATS_PASSWORD")
# NATS takes a user and password instead of a token too; compose logs in with NATS_TOKEN.
ALTERNATIVE_LOGINS = {"NATS_USER", "NATS_PASSWORD"}
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def variables_read_by(service: str) -> dict[str, bool]:
    """NAME -> required, from the calls `f(env, "NAME", ...)` in the service's config.py.

    A call with no default (third argument or `default=`) requires its variable, unless it
    is one of the helpers for optional values.
    """
    tree = ast.parse((REPO / "services" / service / "config.py").read_text())
    optional_helpers = {"env_secret", "env_bool", "_optional"}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args):
            continue
        if not (isinstance(node.args[0], ast.Name) and node.args[0].id == "env"):
            continue
        function = node.func.id
        if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            name = node.args[1].value
        elif function == "env_auth_tokens":
            name = "AUTH_TOKENS"
        elif function == "env_database_url":
            name = "DATABASE_URL"
        elif function == "env_nats":
            # NATS_URL has a default; the logins are optional.
            for login in ("NATS_URL", *NATS_LOGINS):
                found.setdefault(login, False)
            continue
        else:
            continue
        has_default = len(node.args) > 2 or any(kw.arg == "default" for kw in node.keywords)
        forced = any(kw.arg == "required" and getattr(kw.value, "value", None) is True for kw in node.keywords)
        required = forced or (not has_default and function not in optional_helpers)
        found[name] = found.get(name, False) or required
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_the_service_reads_is_set(compose, service):
    """Defaults are made for `make run` on one machine (127.0.0.1 everywhere), so inside
    compose each one must be set, bar tunables whose defaults hold anywhere."""
    environment = compose["services"][service]["environment"]
    read = variables_read_by(service)
    must_be_set = {name for name in read if not TUNABLE.search(name)} - ALTERNATIVE_LOGINS

    assert {"AUTH_TOKENS", "DATABASE_URL"} <= must_be_set, "the AST scan missed variables: the scan is broken"
    assert must_be_set <= set(environment), f"{service} lacks {sorted(must_be_set - set(environment))}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_variable_set_is_one_the_service_reads(compose, service):
    environment = set(compose["services"][service]["environment"])
    known = set(variables_read_by(service)) | {"STORY_ADDR", "IMAGE_ADDR", "CREDITS_ADDR"}
    if service == "image":
        known |= AWS_VARIABLES

    assert environment <= known, f"{service} sets variables it never reads: {sorted(environment - known)}"


@pytest.mark.parametrize("service", SERVICES)
def test_ports_match_the_contract(compose, service):
    port = CONTRACT_PORTS[service]
    definition = compose["services"][service]
    listen = definition["environment"][f"{service.upper()}_ADDR"]

    assert listen == f"0.0.0.0:{port}"
    published = definition.get("ports") or compose["services"][f"{service}-lb"]["ports"]
    assert f"{port}:{port}" in published
    for other in SERVICES:
        if other != service and f"{service.upper()}_ADDR" in compose["services"][other]["environment"]:
            assert compose["services"][other]["environment"][f"{service.upper()}_ADDR"] == f"{service}:{port}"


def test_image_can_scale_and_every_service_uses_the_one_dockerfile(compose):
    assert "ports" not in compose["services"]["image"], "a fixed host port would stop --scale image=3"
    for service in SERVICES:
        definition = compose["services"][service]
        assert definition["build"] == "."
        assert definition["command"] == ["python", "-m", f"services.{service}.main"]
    assert "-js" in compose["services"]["nats"]["command"]
    assert "minio-init" in compose["services"]


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_starts_without_tokens_from_the_environment(compose, service):
    tokens = compose["services"][service]["environment"]["AUTH_TOKENS"]

    assert REQUIRED_FROM_ENVIRONMENT.match(tokens), f"{service}: AUTH_TOKENS must come from the environment: {tokens}"


def test_the_image_process_holds_hashes_and_its_own_token_only(compose):
    environment = compose["services"]["image"]["environment"]

    # Its own table (hashes), not the clear table story and credits get.
    assert REQUIRED_FROM_ENVIRONMENT.match(environment["AUTH_TOKENS"])["name"] == "IMAGE_AUTH_TOKENS"
    assert "sha256" in environment["AUTH_TOKENS"]
    assert REQUIRED_FROM_ENVIRONMENT.match(environment["IMAGE_TOKEN"])["name"] == "IMAGE_TOKEN"
    assert "IMAGE_TOKEN" in variables_read_by("image")


def test_nats_requires_a_login_and_is_not_published(compose):
    nats = compose["services"]["nats"]

    assert "ports" not in nats, "NATS must be reachable from the compose network only"
    command = nats["command"]
    assert REQUIRED_FROM_ENVIRONMENT.match(command[command.index("--auth") + 1])["name"] == "NATS_TOKEN"
    for service in ("story", "image"):
        environment = compose["services"][service]["environment"]
        assert REQUIRED_FROM_ENVIRONMENT.match(environment["NATS_TOKEN"])["name"] == "NATS_TOKEN"
        assert "@" not in environment["NATS_URL"], "credentials belong in NATS_TOKEN, not in the URL"
        assert "NATS_TOKEN" in variables_read_by(service)
