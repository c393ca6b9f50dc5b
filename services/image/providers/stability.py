"""Stability AI's v1 REST API (https://platform.stability.ai/docs/api-reference#tag/v1generation).

POST {base}/v1/generation/stable-diffusion-xl-1024-v1-0/text-to-image, Bearer
STABILITY_API_KEY, Accept: application/json; body {"text_prompts": [{"text", "weight"}],
"width", "height", "samples" (1..10), "steps", "cfg_scale"}. SDXL takes nine sizes only
(1024x1024, 1152x896, ... the catalog lists them). The answer is {"artifacts": [{"base64",
"seed", "finishReason": SUCCESS | CONTENT_FILTERED | ERROR}]}: a filtered artifact is one
image the safety filter withheld, the others are delivered. Errors are {"id", "name",
"message"}; 400 invalid_prompts is the prompt's words being filtered. Stability bills in
credits of $0.01; SDXL 1.0 at 30 steps costs 0.2 credits an image.
"""

from __future__ import annotations

from typing import Any


from services.image.catalog import ProviderName, vendor_model_name
from services.image.providers.base import GenerationRequest, GenerationResult, PreviewCallback
from services.image.providers.errors import ContentRefused, FailureKind, ProviderError
from services.image.providers.http import (
    MAX_BYTES_PER_IMAGE,
    ApiError,
    decode_base64_images,
    error_for_status,
    VendorClient,
)

DEFAULT_BASE_URL = "https://api.stability.ai"
DEFAULT_TIMEOUT_SECONDS = 120
STEPS = 30
CFG_SCALE = 7
# 0.2 credits of $0.01 per SDXL image at 30 steps.
MICRODOLLARS_PER_IMAGE = 2_000
CONTENT_FILTER_NAMES = frozenset({"invalid_prompts", "content_moderation"})


class StabilityClient(VendorClient):
    name = ProviderName.STABILITY
    key_variable = "STABILITY_API_KEY"
    default_base_url = DEFAULT_BASE_URL
    default_timeout = DEFAULT_TIMEOUT_SECONDS

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        api_key = self._key()
        engine = vendor_model_name(request.model, self.name) or "stable-diffusion-xl-1024-v1-0"
        reply = await self._text_to_image(api_key, engine, self.request_body(request))
        artifacts = [item for item in reply.get("artifacts") or [] if isinstance(item, dict)]
        delivered = [item for item in artifacts if item.get("finishReason", "SUCCESS") == "SUCCESS"]
        filtered = sum(1 for item in artifacts if item.get("finishReason") == "CONTENT_FILTERED")
        if not delivered:
            if filtered:
                raise ContentRefused("stability: the safety filter withheld every image", provider=self.name)
            raise ProviderError("stability: no image came back", kind=FailureKind.SERVER, provider=self.name)
        images = await decode_base64_images([item.get("base64") for item in delivered[: request.count]], self.name)
        return GenerationResult(
            images,
            provider=self.name,
            model=request.model,
            cost_microdollars=MICRODOLLARS_PER_IMAGE * len(artifacts),
            refused_count=min(filtered, request.count - len(images)),
            refused_reason="stability: the safety filter withheld this image" if filtered else "",
        )

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            "text_prompts": [{"text": request.prompt, "weight": 1}],
            "width": request.width,
            "height": request.height,
            "samples": request.count,
            "steps": STEPS,
            "cfg_scale": CFG_SCALE,
        }

    async def _text_to_image(self, api_key: str, engine: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        url = f"{self.base_url}/v1/generation/{engine}/text-to-image"
        return await self._post(url, headers=headers, max_bytes=MAX_BYTES_PER_IMAGE * max(1, body["samples"]), json=body)

    def _classify(self, error: ApiError) -> ProviderError:
        if error.status == 400 and error.body.get("name") in CONTENT_FILTER_NAMES:
            return ContentRefused(f"stability: {error.message}", status=400, code=error.code, provider=self.name)
        return error_for_status(self.name, error)
