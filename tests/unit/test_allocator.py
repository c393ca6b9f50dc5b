"""shared.allocator: the malloc settings every service process starts with."""

import platform

import pytest

from shared.allocator import keep_large_buffers


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's parameters are glibc's")
def test_glibc_takes_the_settings() -> None:
    assert keep_large_buffers() is True

