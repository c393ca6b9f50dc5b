"""datetime -> google.protobuf.Timestamp, the way every handler builds its times."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECONDS_PER_DAY = 86_400


def to_timestamp(value: datetime) -> Timestamp:
    """The same Timestamp as Timestamp.FromDatetime, at a quarter of its cost (that one
    goes through utctimetuple and calendar.timegm): it showed in every read RPC's profile.
    A naive datetime is taken as UTC, as FromDatetime takes it."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    since_epoch = value - _EPOCH
    return Timestamp(
        seconds=since_epoch.days * _SECONDS_PER_DAY + since_epoch.seconds, nanos=since_epoch.microseconds * 1000
    )
