"""reprobuild.memory: the allocator and GC settings a lock runs with."""

from __future__ import annotations

import gc
import platform

import pytest

from reprobuild import memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's M_MMAP_THRESHOLD is glibc's")
def test_mmap_threshold_is_set_on_glibc():
    assert memory.unmap_big_blocks() is True


@pytest.mark.parametrize("enabled", [True, False])
def test_gc_paused_holds_the_collector_and_restores_it(enabled):
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        with memory.gc_paused():
            assert not gc.isenabled()
        assert gc.isenabled() == enabled
        with pytest.raises(RuntimeError), memory.gc_paused():
            raise RuntimeError("restored on errors too")
        assert gc.isenabled() == enabled
    finally:
        gc.enable() if was else gc.disable()
