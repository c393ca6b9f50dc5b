"""What moto's server was asked: its request log, read back per bucket and key.

"One object" must mean one PUT: a second PUT of the same key still leaves one key, so
tests count the requests themselves. moto's server (werkzeug) logs every request as
`"PUT /<bucket>/<key> HTTP/1.1" <status>`; each test has a bucket of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/\S*) HTTP/1\.[01]" (?P<status>\d{3})')


def requests_to(log_path: Path, bucket: str, key_prefix: str = "", method: str = "PUT") -> list[tuple[str, int]]:
    """(path, status) of every `method` request to a key of `bucket` starting with key_prefix."""
    wanted = f"/{bucket}/{key_prefix}"
    found = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        match = _REQUEST.search(_ANSI.sub("", line))
        if match and match["method"] == method and match["path"].split("?")[0].startswith(wanted):
            found.append((match["path"].split("?")[0], int(match["status"])))
    return found
