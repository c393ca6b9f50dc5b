"""Errors of the pieces every image pipeline shares (object storage, the consumer loop,
leases): neutral, so that portraits and generation jobs can both catch them without
importing each other."""

from __future__ import annotations


class DependencyUnavailable(Exception):
    """S3, NATS, the database or a peer service is down or too slow; a later try can help."""

    # What a caller of the image service is told to wait (RetryInfo) before trying again.
    retry_after_seconds = 1.0


class LeaseLost(Exception):
    """Another worker took over the work this lease guarded; stop without writing more."""
