"""glibc malloc settings for a service process that moves images around in large buffers.

A 1 MiB picture arrives as a few 256 KiB socket reads and leaves as one 1 MiB body. With
glibc's defaults each of those buffers is served from the heap's top or from a fresh
mmap, and handed back to the kernel on free as soon as the heap's free top passes its
(dynamic) trim threshold; the next buffer then faults its pages in again. On uvloop, whose
reads copy into a new bytes object each time, that made a 1 MiB download cost 2.8 ms of
CPU where 1.3 ms is the parser's work (tests/bench, downloads part). Buffers below
MMAP_THRESHOLD_BYTES now come from the heap and the heap keeps up to TRIM_THRESHOLD_BYTES
of free top for the next one: memory that would be faulted in again moments later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# Larger allocations (a 20 MiB upload, say) still get their own mapping, returned on free.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024
# mallopt's parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_large_buffers() -> bool:
    """Applies the settings above; False (and nothing changed) where the C library is not
    glibc, since mallopt and these parameter numbers are glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError, TypeError):
        log.info("allocator.defaults_kept", extra={"reason": "not glibc"})
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and applied
    if not applied:
        log.warning("allocator.mallopt_refused")
    return applied
