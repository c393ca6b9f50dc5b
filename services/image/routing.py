"""Which provider serves a model now, and failover when one keeps failing.

A model is served by its vendor's own API when that key is set, else through OpenRouter
where OpenRouter serves it; a request may name the provider itself. Each provider has a
circuit breaker: after `failure_threshold` transient failures in a row (or at once, when the
vendor refuses our account: key, quota, credits) it opens, and new calls for its models go
to the other provider serving the same model (vendor <-> OpenRouter). After `cool_down`
it is half-open: the next call tries it again, and its success closes the circuit.

Failover inside one call happens only when the first provider made nothing: an account
refusal or an open circuit. A transient failure is returned to the caller (the job worker
retries with backoff) rather than tried elsewhere at once: a timed-out call may still have
been billed, and the provider is paid once per image per attempt.

ListModels shows a model while some provider serving it is closed or half-open: a
half-open provider must stay listed, or no job would ever arrive to try it again.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.image.catalog import CATALOG, ModelCatalog, ModelSpec, ProviderName, Route, UnsupportedRequest
from services.image.providers.base import (
    GenerationProvider,
    GenerationRequest,
    GenerationResult,
    PreviewCallback,
)
from services.image.providers.errors import (
    FailureKind,
    InvalidRequest,
    ProviderAccountUnusable,
    ProviderError,
    ProviderNotConfigured,
    ProviderUnavailable,
)

log = logging.getLogger(__name__)

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOL_DOWN_SECONDS = 30.0


class CircuitState(enum.StrEnum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls go elsewhere until the cool-down is over
    HALF_OPEN = "half_open"  # one trial call at a time decides


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    cool_down_seconds: float = DEFAULT_COOL_DOWN_SECONDS


class CircuitBreaker:
    """One provider's breaker. Not thread-safe; it lives on one event loop."""

    def __init__(self, provider: str, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.provider = provider
        self._settings = settings
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at < self._settings.cool_down_seconds:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def seconds_until_retry(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._settings.cool_down_seconds - (self._clock() - self._opened_at))

    def try_acquire(self) -> bool:
        """Whether a call may go to this provider now (half-open: one trial at a time)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("provider.circuit_closed", extra={"provider": self.provider})
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self, error: ProviderError) -> None:
        self._trial_in_flight = False
        if error.kind is FailureKind.USER:
            # The provider answered; it was the request it refused.
            self._failures = 0
            if self._opened_at is not None:
                self.record_success()
            return
        account = isinstance(error, ProviderAccountUnusable)
        self._failures += 1
        reopening = self._opened_at is not None  # a failed half-open trial
        if account or reopening or self._failures >= self._settings.failure_threshold:
            self._open(error)

    def release(self) -> None:
        """A trial that ended without a verdict (cancelled) gives its turn back."""
        self._trial_in_flight = False

    def _open(self, error: ProviderError) -> None:
        self._opened_at = self._clock()
        log.warning(
            "provider.circuit_opened",
            extra={
                "provider": self.provider,
                "failures": self._failures,
                "cool_down_seconds": self._settings.cool_down_seconds,
                "error": error.reason,
            },
        )


@dataclass(frozen=True)
class ServedModel:
    """A model some provider serves now, for ListModels."""

    spec: ModelSpec
    provider: ProviderName  # who a new call goes to
    providers: tuple[ProviderName, ...]  # every provider that can serve it now, preferred first


class ModelNotServed(UnsupportedRequest):
    """No configured provider serves the model (or not through the provider named)."""


class ProviderRouter:
    """The GenerationProvider the job worker calls: it picks the provider, checks the request
    against the catalog, and keeps each provider's breaker."""

    name = "router"

    def __init__(
        self,
        providers: Mapping[ProviderName, GenerationProvider],
        *,
        catalog: ModelCatalog = CATALOG,
        breaker: BreakerSettings = BreakerSettings(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._providers = dict(providers)
        self._catalog = catalog
        # The built-in renderer never fails for the network's reasons: it has no breaker.
        self._breakers = {
            name: CircuitBreaker(str(name), breaker, clock) for name in self._providers if name is not ProviderName.LOCAL
        }

    @property
    def catalog(self) -> ModelCatalog:
        return self._catalog

    def configured(self) -> tuple[ProviderName, ...]:
        return tuple(self._providers)

    def circuit_state(self, provider: ProviderName) -> CircuitState:
        breaker = self._breakers.get(provider)
        return breaker.state if breaker else CircuitState.CLOSED

    def routes(self, model: str, provider: ProviderName | None = None) -> tuple[Route, ...]:
        """The configured routes to `model`, preferred first; ModelNotServed when there is none."""
        spec = self._catalog.get(model)
        routes = tuple(route for route in spec.routes if route.provider in self._providers)
        if provider is not None:
            routes = tuple(route for route in routes if route.provider == provider)
            if not routes:
                raise ModelNotServed("provider", f"{provider} does not serve {model} here")
        if not routes:
            raise ModelNotServed("model", f"{model} is not served now: no provider for it is configured")
        return routes

    def served_models(self) -> list[ServedModel]:
        """What ListModels shows: each model some closed (or half-open) provider serves now."""
        served = []
        for spec in self._catalog:
            available = tuple(
                route.provider
                for route in spec.routes
                if route.provider in self._providers and self.circuit_state(route.provider) is not CircuitState.OPEN
            )
            if available:
                served.append(ServedModel(spec, available[0], available))
        return served

    def provider_for(self, model: str, provider: ProviderName | None = None) -> ProviderName:
        """Who would serve a new call for `model` now (for CreateGenerationJob's checks)."""
        routes = self.routes(model, provider)
        for route in routes:
            if self.circuit_state(route.provider) is not CircuitState.OPEN:
                return route.provider
        raise ModelNotServed("model", f"{model} is not served now: its providers are failing, try again later")

    async def generate(
        self, request: GenerationRequest, *, on_preview: PreviewCallback | None = None
    ) -> GenerationResult:
        spec = self._check(request)
        try:
            routes = self.routes(request.model, request.provider)
        except ModelNotServed as error:
            # Accepted while it was served; the key has gone since: ours to fix, refunded.
            raise ProviderNotConfigured(str(error)) from None
        skipped: list[str] = []
        last_error: ProviderError | None = None
        for position, route in enumerate(routes):
            breaker = self._breakers.get(route.provider)
            if breaker is not None and not breaker.try_acquire():
                skipped.append(str(route.provider))
                continue
            try:
                result = await self._providers[route.provider].generate(request, on_preview=on_preview)
            except ProviderError as error:
                if breaker is not None:
                    breaker.record_failure(error)
                last_error = error
                if isinstance(error, ProviderAccountUnusable) and position + 1 < len(routes):
                    log.warning(
                        "provider.failover_chosen",
                        extra={"model": spec.id, "provider": str(route.provider), "error": error.reason},
                    )
                    continue
                raise
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            if breaker is not None:
                breaker.record_success()
            if skipped:
                log.info("provider.failover_served", extra={"model": spec.id, "provider": str(route.provider), "skipped": skipped})
            return result
        if last_error is not None:
            raise last_error
        retry_after = min((self._breakers[ProviderName(name)].seconds_until_retry() for name in skipped), default=None)
        raise ProviderUnavailable(
            f"{spec.id}: every provider serving it is failing ({', '.join(skipped)}); try again later",
            retry_after=retry_after or None,
        )

    def _check(self, request: GenerationRequest) -> ModelSpec:
        """The catalog's rules, checked before any provider is paid; InvalidRequest (USER) if broken."""
        try:
            spec = self._catalog.check(
                request.model,
                width=request.width,
                height=request.height,
                num_images=request.count,
                quality=request.quality,
                operation=request.edit.operation if request.edit else None,
                prompt=request.prompt,
            )
        except UnsupportedRequest as error:
            raise InvalidRequest(str(error), code=error.field) from None
        if request.count > spec.max_images_per_call:
            raise InvalidRequest(
                f"num_images: {spec.id} makes at most {spec.max_images_per_call} per call; split the job",
                code="num_images",
            )
        return spec
