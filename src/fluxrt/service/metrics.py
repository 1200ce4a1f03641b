"""Prometheus metrics in the text exposition format (version 0.0.4), with no client library.

Contract:
    Metrics()                       counters and histograms, safe to update from any thread
    metrics.finished(status, latency_s, run_s) / rejected(reason) / batch(n_jobs, n_images) / blocked()
    metrics.render(gauges) -> str   `gauges` is [(name, help, value, labels)] read at scrape time (queue depth,
                                    GPU memory, ...); counters and histograms follow
    gpu_memory() -> [(name, help, value, labels)]   torch.cuda allocated / reserved / total bytes per device
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # seconds: tiny CPU jobs to 1024^2 dev


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]  # fmt: skip


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: dict | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v!s}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.finished_total: dict[str, int] = defaultdict(int)
        self.rejected_total: dict[str, int] = defaultdict(int)
        self.blocked_total = 0
        self.batches_total = 0
        self.batch_images_total = 0
        self.latency = Histogram()  # submit -> finished
        self.run = Histogram()  # started -> finished
        self.recent_run_s: list[float] = []  # for Retry-After estimates

    def finished(self, status: str, latency_s: float, run_s: float | None) -> None:
        with self._lock:
            self.finished_total[status] += 1
            self.latency.observe(latency_s)
            if run_s is not None:
                self.run.observe(run_s)
                self.recent_run_s = (self.recent_run_s + [run_s])[-20:]

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected_total[reason] += 1

    def batch(self, n_images: int) -> None:
        with self._lock:
            self.batches_total += 1
            self.batch_images_total += n_images

    def blocked(self) -> None:
        with self._lock:
            self.blocked_total += 1

    def mean_run_s(self, default: float = 5.0) -> float:
        with self._lock:
            return sum(self.recent_run_s) / len(self.recent_run_s) if self.recent_run_s else default

    def render(self, gauges: list[tuple[str, str, float, dict | None]]) -> str:
        lines: list[str] = []
        seen: set[str] = set()
        for name, help_, value, labels in gauges:
            if name not in seen:
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
                seen.add(name)
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
        with self._lock:
            lines += ["# HELP fluxrt_jobs_finished_total Jobs finished since start, by final status.",
                      "# TYPE fluxrt_jobs_finished_total counter"]  # fmt: skip
            for status in ("succeeded", "failed", "cancelled"):
                lines.append(f'fluxrt_jobs_finished_total{{status="{status}"}} {self.finished_total[status]}')
            lines += ["# HELP fluxrt_requests_rejected_total Requests refused with 429, by reason.",
                      "# TYPE fluxrt_requests_rejected_total counter",
                      f'fluxrt_requests_rejected_total{{reason="queue_full"}} {self.rejected_total["queue_full"]}',
                      "# HELP fluxrt_safety_blocked_total Jobs failed: the safety policy blocked an input or output.", "# TYPE fluxrt_safety_blocked_total counter",
                      f"fluxrt_safety_blocked_total {self.blocked_total}",
                      "# HELP fluxrt_batches_total Batches run on the model.", "# TYPE fluxrt_batches_total counter",
                      f"fluxrt_batches_total {self.batches_total}",
                      "# HELP fluxrt_batch_images_total Images generated in batches.",
                      "# TYPE fluxrt_batch_images_total counter", f"fluxrt_batch_images_total {self.batch_images_total}",
                      "# HELP fluxrt_job_latency_seconds Time from submission to the end of a job.",
                      "# TYPE fluxrt_job_latency_seconds histogram", *self.latency.lines("fluxrt_job_latency_seconds"),
                      "# HELP fluxrt_job_run_seconds Time a job spent running on the model.",
                      "# TYPE fluxrt_job_run_seconds histogram", *self.run.lines("fluxrt_job_run_seconds")]  # fmt: skip
        return "\n".join(lines) + "\n"


def gpu_memory() -> list[tuple[str, str, float, dict | None]]:
    """Allocated / reserved / total bytes of every CUDA device torch sees (nothing on a CPU-only machine)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        labels = {"device": f"cuda:{i}"}
        out += [("fluxrt_gpu_memory_allocated_bytes", "Memory held by tensors on the GPU.",
                 float(torch.cuda.memory_allocated(i)), labels),
                ("fluxrt_gpu_memory_reserved_bytes", "Memory reserved by the caching allocator on the GPU.",
                 float(torch.cuda.memory_reserved(i)), labels),
                ("fluxrt_gpu_memory_total_bytes", "Total memory of the GPU.",
                 float(torch.cuda.get_device_properties(i).total_memory), labels)]  # fmt: skip
    return out


def process_memory() -> list[tuple[str, str, float, dict | None]]:
    """Resident memory of this process (Linux /proc), so a CPU-only server still reports its memory."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return []
    import os

    return [("process_resident_memory_bytes", "Resident memory size in bytes.", float(pages * os.sysconf("SC_PAGE_SIZE")),
             None)]  # fmt: skip
