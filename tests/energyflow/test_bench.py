"""energyflow.bench, the benchmarks' harness: interleaving, per-round batches, peak memory, the writer."""
from __future__ import annotations

import json

import pytest
import torch

from energyflow import bench


def test_interleaved_alternates_records_after_warmup_and_steps_share_each_rounds_batch():
    calls = []
    seconds = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the order alternates round by round
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3}
    assert all(value >= 0 for values in seconds.values() for value in values)
    assert bench.medians({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}
    seen = []
    bench.interleaved_steps({"x": lambda b, i: seen.append(("x", b, i)), "y": lambda b, i: seen.append(("y", b, i))},
                            ["b0", "b1", "b2"], warmup=1)
    assert seen == [("x", "b0", 0), ("y", "b0", 0), ("x", "b1", 1), ("y", "b1", 1), ("x", "b2", 2), ("y", "b2", 2)]
    with pytest.raises(ValueError, match="rounds >= 1"):
        bench.interleaved({"a": lambda: None}, rounds=0)


def test_peak_memory_sees_a_transient_allocation_and_the_writer_adds_the_machine(tmp_path):
    def allocate():
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed
        return float(block[-1])

    assert bench.peak_memory(allocate, "cpu") > 32 * 2**20
    paths = bench.write(tmp_path / "out", "demo", {"x": 1}, "| a |\n")
    payload = json.loads(paths[0].read_text())
    assert payload["x"] == 1 and payload["machine"]["torch"] == torch.__version__ and paths[1].read_text() == "| a |\n"
    assert payload["machine"]["cpu_model"] and payload["machine"]["cpu_count"] >= 1  # results differ by CPU
