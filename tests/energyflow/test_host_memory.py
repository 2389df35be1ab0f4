"""``energyflow.host_memory``: freed CPU memory stays in the process, and ``release_freed_memory`` hands it back.

The allocator's thresholds are process-wide and cannot be restored, so each check runs in a fresh interpreter.
What is asserted is the resident set (``VmRSS``) around freeing one 64 MiB tensor: glibc maps a tensor that
large on its own by default and unmaps it on free (the resident set drops by its 64 MiB), while with the
memory retained it stays resident until ``malloc_trim`` hands it back. 48 MiB / 16 MiB thresholds leave room for
the interpreter's own allocations between the readings (a few MiB at most).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from energyflow import host_memory

glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="the allocator settings exist on Linux/glibc only")

PROBE = """
import json, sys, torch
from energyflow import bench, host_memory
retained = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
x = torch.ones(64 << 18)  # 64 MiB, every page touched
held = bench.rss_bytes()
del x
freed = bench.rss_bytes()
released = host_memory.release_freed_memory()
print(json.dumps({"retained": retained, "held": held, "freed": freed, "trimmed": bench.rss_bytes(),
                  "released": released}))
"""
MIB = 2**20


def probe(mode: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@glibc
def test_by_default_a_freed_tensor_goes_back_to_the_kernel():
    result = probe("default")
    assert result["held"] - result["freed"] > 48 * MIB


@glibc
def test_retained_memory_stays_resident_until_released():
    result = probe("retain")
    assert result["retained"] is True
    assert result["held"] - result["freed"] < 16 * MIB  # kept for the next step
    assert result["released"] is True and result["freed"] - result["trimmed"] > 48 * MIB  # handed back


def test_without_glibc_both_do_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    host_memory.retain_freed_memory.cache_clear()
    try:
        assert host_memory.retain_freed_memory() is False and host_memory.release_freed_memory() is False
    finally:
        host_memory.retain_freed_memory.cache_clear()
