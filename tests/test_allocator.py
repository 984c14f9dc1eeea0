"""giantpipe-train keeps freed CPU memory mapped (glibc thresholds), unless told not to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from giantpipe.platform import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def test_thresholds_reach_this_process_and_its_children(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("GIANTPIPE_KEEP_FREED_MEMORY", raising=False)
    assert allocator.keep_freed_memory() is True
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_THRESHOLD_'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert int(child.stdout) == allocator.MMAP_THRESHOLD


def test_the_users_values_win_and_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("GIANTPIPE_KEEP_FREED_MEMORY", raising=False)
    assert allocator.keep_freed_memory() is True
    assert allocator.os.environ["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    monkeypatch.setenv("GIANTPIPE_KEEP_FREED_MEMORY", "0")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory() is False
    assert "MALLOC_TRIM_THRESHOLD_" not in allocator.os.environ
