"""ImageService.ListModels through a real gRPC server (the servicer, the auth interceptor)
over the router main.py builds from the environment, keys pointing at fake providers.

The rest of the service (database, NATS, S3) plays no part in ListModels, so it is not
started here; test_image_get_url covers the whole build.
"""

from __future__ import annotations

import contextlib

import grpc
import pytest

from casefile.image.v1 import image_service_pb2, image_service_pb2_grpc
from services.image.config import Config
from services.image.handlers import ALLOWED_CALLERS, SERVICE_NAME, ImageServicer
from services.image.main import provider_router
from shared.auth import AuthInterceptor, bearer_metadata
from shared.grpc_server import ServiceSpec, start_grpc_server
from tests.fakes.gemini import FakeGemini
from tests.fakes.openrouter import FakeOpenRouter

pytestmark = pytest.mark.timeout(60)

TOKENS = "gateway:t-gateway,story:t-story,image:t-image"
GATEWAY = bearer_metadata("t-gateway")


@pytest.fixture
async def start_image():
    """start_image(env) -> an ImageService stub whose ListModels answers from `env`'s keys."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(env: dict[str, str]) -> image_service_pb2_grpc.ImageServiceStub:
            config = Config.from_env(env)
            # ListModels reads the router only: no database, S3 or job pipeline behind it.
            servicer = ImageServicer(objects=None, models=provider_router(config), jobs_deps=None, changes=None)
            server = await start_grpc_server(
                listen_addr="127.0.0.1:0",
                services=[
                    ServiceSpec(
                        SERVICE_NAME,
                        lambda grpc_server: image_service_pb2_grpc.add_ImageServiceServicer_to_server(
                            servicer, grpc_server
                        ),
                    )
                ],
                interceptors=[AuthInterceptor(config.auth_tokens.reveal(), ALLOWED_CALLERS)],
            )
            stack.push_async_callback(server.stop, 0)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
            stack.push_async_callback(channel.close)
            return image_service_pb2_grpc.ImageServiceStub(channel)

        yield start


@pytest.fixture
def image_env():
    def make(**overrides: str) -> dict[str, str]:
        return {"AUTH_TOKENS": TOKENS, **overrides}

    return make


def by_id(response: image_service_pb2.ListModelsResponse) -> dict[str, image_service_pb2.Model]:
    return {model.id: model for model in response.models}


async def test_with_no_keys_only_local_sketch_is_listed(start_image, image_env):
    image = await start_image(image_env())
    response = await image.ListModels(image_service_pb2.ListModelsRequest(), metadata=GATEWAY)

    [sketch] = response.models
    assert (sketch.id, sketch.provider, sketch.credits_per_image) == ("local/sketch", "local", 100)
    assert (sketch.min_side, sketch.max_side, list(sketch.sizes)) == (64, 2048, [])
    assert (sketch.max_images_per_call, sketch.supports_edit, sketch.supports_stream) == (10, True, True)
    assert len(sketch.edit_operations) == 5
    assert list(sketch.providers) == ["local"]


async def test_keys_list_the_models_their_providers_serve_with_prices_and_sizes(start_image, image_env):
    env = image_env(
        OPENAI_API_KEY="sk-test", OPENAI_BASE_URL="http://127.0.0.1:9/v1", OPENROUTER_API_KEY="or-test",
        OPENROUTER_BASE_URL="http://127.0.0.1:9/api/v1",
    )  # fmt: skip
    image = await start_image(env)
    models = by_id(await image.ListModels(image_service_pb2.ListModelsRequest(), metadata=GATEWAY))

    assert set(models) == {
        "openai/dall-e-3", "openai/dall-e-2", "openai/gpt-image-1", "google/gemini-2.5-flash-image", "local/sketch",
    }  # fmt: skip
    gpt = models["openai/gpt-image-1"]
    assert (gpt.provider, gpt.credits_per_image, gpt.default_quality) == (
        "openai",
        600,
        image_service_pb2.QUALITY_MEDIUM,
    )
    assert [(price.quality, price.credits_per_image) for price in gpt.quality_prices] == [
        (image_service_pb2.QUALITY_LOW, 200), (image_service_pb2.QUALITY_MEDIUM, 600),
        (image_service_pb2.QUALITY_HIGH, 2400),
    ]  # fmt: skip
    assert [(size.width, size.height) for size in gpt.sizes] == [(1024, 1024), (1536, 1024), (1024, 1536)]
    assert gpt.supports_stream and gpt.supports_edit
    dall_e_3 = models["openai/dall-e-3"]
    assert (dall_e_3.max_images_per_call, dall_e_3.supports_edit, dall_e_3.supports_stream) == (1, False, False)
    gemini = models["google/gemini-2.5-flash-image"]
    assert (gemini.provider, list(gemini.providers)) == ("openrouter", ["openrouter"])


async def test_list_models_shows_the_vendor_first_when_both_keys_are_set(start_image, image_env):
    async with FakeGemini(api_key="g") as gemini, FakeOpenRouter(api_key="o") as openrouter:
        env = image_env(
            GEMINI_API_KEY="g", GEMINI_BASE_URL=gemini.api_base_url, OPENROUTER_API_KEY="o",
            OPENROUTER_BASE_URL=openrouter.api_base_url,
        )  # fmt: skip
        image = await start_image(env)
        models = by_id(await image.ListModels(image_service_pb2.ListModelsRequest(), metadata=GATEWAY))
    assert list(models["google/gemini-2.5-flash-image"].providers) == ["gemini", "openrouter"]


async def test_list_models_is_for_the_gateway_and_admins_only(start_image, image_env):
    image = await start_image(image_env())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await image.ListModels(image_service_pb2.ListModelsRequest(), metadata=(("authorization", "Bearer t-story"),))
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
