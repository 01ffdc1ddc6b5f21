"""TensorBoard charts of every push: stage latencies, bytes, throughput, buckets, version, fallback.

Each push's SyncReport becomes scalars under ``sync/`` at the trainer's global step:

    sync/plan_s  sync/pack_s  sync/transfer_s  sync/apply_s  sync/total_s   seconds per stage (this rank; apply is
                                                                            the slowest receiver)
    sync/bytes   sync/gbps    sync/num_buckets sync/version  sync/fallback  (1.0 when the push ran slower than
                                                                            configured, e.g. the memory budget)

and a custom-scalars layout (TensorBoard's "Custom Scalars" tab) puts the five latencies on one chart, so a slow stage
stands out at a glance. Only trainer rank 0 writes; other ranks get ``None`` from ``for_rank``.

Logging is on when ``SyncConfig.tb_dir`` is set (WeightSync makes one of these at construction), or when an
Accelerate tracker is TensorBoard (``SyncMetrics.from_accelerator``, used by ``sync.attach(..., accelerator=acc)``):
then the charts land next to the run's own scalars, in the tracker's writer.
"""
from __future__ import annotations

import os

from ..protocol.report import SyncReport

PREFIX = "sync/"
STAGES = ("plan_s", "pack_s", "transfer_s", "apply_s", "total_s")
TAGS = tuple(PREFIX + s for s in STAGES) + tuple(PREFIX + s for s in (
    "bytes", "gbps", "num_buckets", "version", "fallback"))

LAYOUT = {
    "trainer_sync": {
        "push latency per stage (s)": ["Multiline", [PREFIX + s for s in STAGES]],
        "effective throughput (GB/s)": ["Multiline", [PREFIX + "gbps"]],
        "bytes and buckets": ["Multiline", [PREFIX + "bytes", PREFIX + "num_buckets"]],
        "weight version and fallback": ["Multiline", [PREFIX + "version", PREFIX + "fallback"]],
    }
}


def report_scalars(report: SyncReport) -> dict[str, float]:
    """The scalars one push logs, keyed by tag."""
    values = {s: float(getattr(report, s)) for s in STAGES}
    values.update(bytes=float(report.bytes), gbps=float(report.gbps), num_buckets=float(report.num_buckets),
                  version=float(report.version), fallback=1.0 if report.fallback else 0.0)
    return {PREFIX + k: v for k, v in values.items()}


class SyncMetrics:
    """Writes each push's report to TensorBoard. Give a ``log_dir`` (a SummaryWriter is made and owned here) or an
    existing ``writer`` (a ``SummaryWriter``, e.g. an Accelerate tracker's; it is flushed, never closed, here)."""

    def __init__(self, log_dir: str | None = None, writer=None):
        if (log_dir is None) == (writer is None):
            raise ValueError("SyncMetrics needs exactly one of log_dir and writer")
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is an optional dependency
                raise ImportError("trainer_sync: SyncConfig.tb_dir is set but tensorboard is not installed "
                                  "(pip install tensorboard)") from e
            os.makedirs(log_dir, exist_ok=True)
            writer = SummaryWriter(log_dir=log_dir)
            self._owned = True
        else:
            self._owned = False
        self.writer = writer
        self.log_dir = log_dir or getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
        self.pushes = 0
        self._layout_written = False

    @classmethod
    def for_rank(cls, rank: int, log_dir: str | None = None, writer=None) -> "SyncMetrics | None":
        """A SyncMetrics on trainer rank 0 when there is somewhere to log; None elsewhere."""
        if rank != 0 or (log_dir is None and writer is None):
            return None
        return cls(log_dir=log_dir, writer=writer)

    @classmethod
    def from_accelerator(cls, accelerator) -> "SyncMetrics | None":
        """The TensorBoard tracker's writer of an ``accelerate.Accelerator`` (main process only), else None."""
        if not getattr(accelerator, "is_main_process", False):
            return None
        for tracker in getattr(accelerator, "trackers", []) or []:
            if getattr(tracker, "name", "") == "tensorboard":
                writer = getattr(tracker, "writer", None) or tracker.tracker
                return cls(writer=writer)
        return None

    def log(self, report: SyncReport, step: int | None = None) -> None:
        """Log one push at ``step`` (default: the report's version, which the hooks set to the global step)."""
        if not self._layout_written:
            # Metadata only; once per writer (TensorBoard keeps the last layout it reads).
            self.writer.add_custom_scalars(LAYOUT)
            self._layout_written = True
        step = report.version if step is None else int(step)
        for tag, value in report_scalars(report).items():
            self.writer.add_scalar(tag, value, step)
        self.pushes += 1
        self.writer.flush()

    def log_error(self, step: int) -> None:
        """Count a failed push (the hooks' warn policy keeps training): ``sync/errors`` at ``step``."""
        self.errors = getattr(self, "errors", 0) + 1
        self.writer.add_scalar(PREFIX + "errors", float(self.errors), int(step))
        self.writer.flush()

    def close(self) -> None:
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``log_dir`` (all event files, recursively) as ``[(step, value), ...]``, read back with
    TensorBoard's EventAccumulator (what the charts show). For tests and for checking a run from a script."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for root, _, files in os.walk(log_dir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    for v in out.values():
        v.sort()
    return out


def has_custom_layout(log_dir: str) -> bool:
    """Whether a custom-scalars layout was written under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for root, _, files in os.walk(log_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"tensors": 0})
            acc.Reload()
            if "custom_scalars__config__" in acc.Tags().get("tensors", []):
                return True
    return False


# --- one folder per run and per launch config (TensorBoard shows runs side by side) ---------------------------------
def launch_name() -> str:
    """A short name for how this process was launched, from the environment ``accelerate launch`` / torchrun set:
    ``zero3`` (DeepSpeed ZeRO stage 3), ``fsdp2`` (Accelerate FSDP version 2), else ``cpu-2rank`` / ``gpu-4rank``
    (plain or DDP ranks, or one process)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "zero" + env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp" + env.get("FSDP_VERSION", "1")
    try:
        import torch

        gpu = torch.cuda.is_available() and env.get("ACCELERATE_USE_CPU", "").lower() != "true"
    except ImportError:
        gpu = False
    return f"{'gpu' if gpu else 'cpu'}-{env.get('WORLD_SIZE', '1')}rank"


def run_dir(root: str, name: str | None = None) -> str:
    """``root/<launch name>-<YYYYmmdd-HHMMSS>``: one folder per run and config, so that ``tensorboard --logdir root``
    shows runs side by side. Every rank of one launch gets the same folder without talking to the others: under
    torchrun / ``accelerate launch`` the time is the start time of the launcher (the ranks' common parent)."""
    import time

    stamp = time.time()
    if "LOCAL_RANK" in os.environ:  # a rank started by torchrun's agent: its start time is the same for all ranks
        try:
            with open(f"/proc/{os.getppid()}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, clock ticks after boot
            with open("/proc/stat") as f:
                btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
            stamp = btime + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, StopIteration, IndexError):
            pass  # not Linux: the ranks' own clocks (the same second, nearly always)
    return os.path.join(root, f"{name or launch_name()}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(stamp))}")
