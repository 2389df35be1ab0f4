"""The benchmark harness every script in ``benchmarks/`` uses: interleaved timing with warm-up and device
synchronization, peak memory, machine metadata, and one JSON + markdown writer.

- ``interleaved(runs, rounds=..., warmup=...)``: every run of ``{name: callable}`` once per round, the order
  alternating between rounds so that a change of machine load hits all alike; ``warmup`` unrecorded rounds
  first; each timing synchronizes CUDA before and after (``synchronize``), so asynchronous kernels are counted.
  Returns ``{name: [seconds per round]}``; ``medians`` summarizes.
- ``peak_memory(fn, device)``: the peak growth of memory while ``fn`` runs: ``torch.cuda.max_memory_allocated``
  on CUDA, the resident set's high-water mark (``VmHWM``, reset first through ``/proc/self/clear_refs``) on CPU.
- ``machine(device)``: device, CPU model and count, threads, torch / Python versions, load average.
- ``write(out_dir, stem, payload, markdown)``: ``stem.json`` (with ``machine`` filled in if missing) and
  ``stem.md``, written atomically.

It lives in the package (not in ``benchmarks/``) so scripts need no ``sys.path`` edits: run them from an
installed checkout (``pip install -e .``).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

Device = Union[str, torch.device, None]


def synchronize(device: Device = None) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: Device = None) -> float:
    """Seconds of one call, CUDA synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(runs: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 1, device: Device = None,
                alternate: bool = True, progress: Optional[Callable[[int], None]] = None) -> dict[str, list[float]]:
    """``{name: [seconds, ...]}`` over ``rounds`` recorded rounds after ``warmup`` unrecorded ones."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds}, {warmup}")
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        order = names if not alternate or index % 2 == 0 else list(reversed(names))
        for name in order:
            elapsed = timed(runs[name], device)
            if index >= warmup:
                seconds[name].append(elapsed)
        if progress is not None and index >= warmup:
            progress(index - warmup + 1)
    return seconds


def interleaved_steps(steps: Mapping[str, Callable[[Any, int], Any]], batches: list, *, warmup: int = 1,
                      device: Device = None) -> dict[str, list[float]]:
    """Training-step benchmarks: round ``i`` gives every variant ``steps[name](batches[i], i)`` (the same batch),
    in a fixed order; ``warmup`` first rounds unrecorded, one round per remaining batch."""
    names, position = list(steps), {"round": 0}

    def run(name: str) -> None:
        index = position["round"]
        steps[name](batches[index], index)
        if name == names[-1]:
            position["round"] += 1

    return interleaved({name: (lambda name=name: run(name)) for name in names}, rounds=len(batches) - warmup,
                       warmup=warmup, device=device, alternate=False)


def medians(seconds: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def rss_bytes(field: str = "VmRSS") -> int:
    """Current (``VmRSS``) or peak (``VmHWM``) resident set size of this process (Linux /proc)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the high-water mark back to the current RSS


def peak_memory(fn: Callable[[], Any], device: Device = "cpu") -> int:
    """Bytes the peak rose by while ``fn`` ran (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    reset_rss_peak()
    before = rss_bytes()
    fn()
    return rss_bytes("VmHWM") - before


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): ratios between
    kernels move from one CPU to the next (the EBT / Transformer++ step is 4.9x on one, 5.5x on another)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: Device = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "cpu_model": cpu_model(),
                            "cpu_count": os.cpu_count(),
                            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                            "torch": torch.__version__, "threads": torch.get_num_threads(),
                            "load_average_1min": os.getloadavg()[0]}
    if device.type == "cuda" and torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, device_name=torch.cuda.get_device_name(device))
    return info


def write(out_dir: Union[str, Path], stem: str, payload: dict, markdown: str, *,
          device: Device = "cpu") -> list[Path]:
    """``out_dir/stem.json`` (``payload`` plus ``machine`` unless it has one) and ``out_dir/stem.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = payload if "machine" in payload else {**payload, "machine": machine(device)}
    paths = []
    for name, text in ((f"{stem}.json", json.dumps(payload, indent=2, default=str) + "\n"), (f"{stem}.md", markdown)):
        path, temporary = out_dir / name, out_dir / (name + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
        paths.append(path)
    return paths
