"""A REAL vLLM engine on a GPU (the device tool's H200 with ../shared/gpu-vllm's vLLM 0.26): no stand-ins.

The trainer is this test process (its model on cuda:0); the engines run with vLLM's defaults (torch.compile and
CUDA graphs on; the engine core in its own process), so the push goes by CUDA IPC between two processes on one
GPU, as with a colocated trainer. What counts is what the engine then generates: its greedy tokens must equal a
FRESH engine loaded from the trainer's weights (saved as a checkpoint), after several pushes. The fast apply path
(engines/placement.py) must take over from the second push on and stay equal.

Run there: ``source /tmp/gpu-stash/activate.sh && python -m pytest -m gpu tests/gpu/test_vllm_gpu.py``.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
vllm = pytest.importorskip("vllm")

from tests.helpers.models import build_model, prompts, save_model  # noqa: E402
from tests.helpers.cluster import free_port  # noqa: E402
from tests.helpers.vllm_engines import BACKEND, Server  # noqa: E402

from trainer_sync import SyncConfig, SyncError, WeightSync  # noqa: E402
from trainer_sync.engines.clients import HttpClient  # noqa: E402

N = 12
# vLLM's defaults (compile + CUDA graphs), made small: a few graph sizes and a small KV cache, so that an engine
# starts in tens of seconds; several engines share the GPU.
GPU_ARGS = dict(dtype="bfloat16", skip_tokenizer_init=True, max_model_len=512, max_num_seqs=8, seed=0,
                gpu_memory_utilization=0.12, compilation_config={"cudagraph_capture_sizes": [1, 2, 4, 8]})
MODEL = dict(dtype="bfloat16", hidden=128, layers=2)


def start_llm(model_dir: str):
    from vllm import LLM

    return LLM(model=model_dir, weight_transfer_config=BACKEND, **GPU_ARGS)


def stop_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def greedy(llm, ps: list[list[int]], n: int = N) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in ps],
                        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def train_step(model, seed: int, lr: float = 3e-3) -> None:
    """One real AdamW-free SGD-with-sign step on a random batch (moves bf16 weights visibly)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (2, 32), generator=gen, device="cuda")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad.sign(), alpha=-lr)
                p.grad = None
    model.eval()


def fresh_tokens(model, tmp_path, name: str) -> list[list[int]]:
    """Greedy tokens of a fresh engine loaded from the trainer's current weights."""
    ref_dir = str(tmp_path / name)
    model.save_pretrained(ref_dir, safe_serialization=True)
    ref = start_llm(ref_dir)
    try:
        return greedy(ref, list(prompts().values()))
    finally:
        stop_llm(ref)


@pytest.fixture(scope="module", params=["untied", "tied"])
def engine(request, tmp_path_factory):
    tied = request.param == "tied"
    model_dir = save_model(str(tmp_path_factory.mktemp(f"qwen3-{request.param}")), seed=0, tied=tied, **MODEL)
    llm = start_llm(model_dir)
    yield llm, tied
    stop_llm(llm)


def test_pushes_equal_a_fresh_engine(engine, tmp_path):
    """Three pushes with training in between: layerwise on the first (which proves the fast path's placement),
    straight into place after; the engine then generates exactly what a fresh engine on those weights does."""
    llm, tied = engine
    model = build_model(seed=0, tied=tied, **MODEL).cuda()
    ps = list(prompts().values())
    before = greedy(llm, ps)
    applied = []
    with WeightSync(model, [llm]) as sync:
        for step in range(3):
            train_step(model, seed=step)
            report = sync.push()
            applied.append(report.engine_apply)
        assert sync.weight_versions()  # every engine answers
    assert applied[0] == "layerwise" and applied[1:] == ["direct", "direct"], applied
    after = greedy(llm, ps)
    assert after != before
    assert after == fresh_tokens(model, tmp_path, "ref")


def test_layerwise_only_equals_the_fast_path(engine, tmp_path):
    """SyncConfig(engine_apply="layerwise") keeps vLLM's reload for every push; same tokens as a fresh engine."""
    llm, tied = engine
    model = build_model(seed=3, tied=tied, **MODEL).cuda()
    with WeightSync(model, [llm], SyncConfig(engine_apply="layerwise")) as sync:
        for step in range(2):
            train_step(model, seed=10 + step)
            assert sync.push().engine_apply == "layerwise"
    assert greedy(llm, list(prompts().values())) == fresh_tokens(model, tmp_path, "ref-layerwise")


def test_fp8_on_the_wire_into_a_bf16_engine(engine, tmp_path):
    """wire_dtype="fp8": block-quantized on the trainer's GPU, dequantized on arrival; the engine serves exactly the
    fp8 round trip of the trainer's weights (what a fresh engine on those round-tripped weights generates)."""
    from trainer_sync.codec import dequantize_fp8_blocks, fp8_eligible, quantize_fp8_blocks

    llm, tied = engine
    model = build_model(seed=5, tied=tied, **MODEL).cuda()
    train_step(model, seed=20)
    with WeightSync(model, [llm], SyncConfig(wire_dtype="fp8")) as sync:
        report = sync.push()
        assert "float8" in report.wire_dtype
    with torch.no_grad():  # what the engine received: eligible weights through fp8 and back, the rest as they are
        for name, p in model.named_parameters():
            if fp8_eligible(name, p.shape, p.dtype):
                q, s = quantize_fp8_blocks(p.data)
                p.data.copy_(dequantize_fp8_blocks(q, s, p.dtype))
    assert greedy(llm, list(prompts().values())) == fresh_tokens(model, tmp_path, "ref-fp8")


def test_gpu_memory_flat_over_50_pushes(engine):
    """50 pushes (the fast path): the GPU's free memory, read by the trainer process while both sides are idle,
    ends where it was after the first few pushes (no growth per push on either side)."""
    llm, tied = engine
    model = build_model(seed=7, tied=tied, **MODEL).cuda()
    free = []
    with WeightSync(model, [llm]) as sync:
        for i in range(50):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)
            sync.push()
            if i in (4, 49):
                torch.cuda.synchronize()
                free.append(torch.cuda.mem_get_info()[0])
    assert abs(free[1] - free[0]) < 8 * 2**20, free


def test_block_fp8_checkpoint_engine(tmp_path):
    """A block-FP8 checkpoint (float8_e4m3fn weights + float32 128x128 block scales, DeepSeek-V3 / Qwen3-FP8 style)
    served by vLLM on the GPU: the default wire_dtype="auto" sends fp8 codes + scales in checkpoint format (quantized
    on the trainer's GPU) and the engine then generates exactly what a fresh engine started from a block-FP8
    checkpoint of the trainer's weights does (the reference is quantized by the same GPU kernel)."""
    from tests.helpers.fp8_engines import save_block_fp8

    # vLLM's fused qkv / gate_up block scales need every shard's output a multiple of the 128-wide block
    # (q 256, k and v 128, gate and up 512), as in real FP8 checkpoints.
    model = build_model(seed=0, tied=False, dtype="bfloat16", hidden=256, layers=2, head_dim=128).cuda()
    ps = list(prompts().values())
    llm = start_llm(save_block_fp8(model, str(tmp_path / "block-fp8")))
    try:
        before = greedy(llm, ps)
        train_step(model, seed=40)
        with WeightSync(model, [llm]) as sync:
            report = sync.push()
        assert "float8_e4m3fn" in report.wire_dtype, report.wire_dtype
        pushed = greedy(llm, ps)
    finally:
        stop_llm(llm)
    assert pushed != before
    ref = start_llm(save_block_fp8(model, str(tmp_path / "ref-block-fp8")))
    try:
        assert pushed == greedy(ref, ps)
    finally:
        stop_llm(ref)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model_dir = save_model(str(tmp_path_factory.mktemp("qwen3-serve")), seed=0, tied=False, **MODEL)
    log = str(tmp_path_factory.mktemp("serve") / "vllm_serve.log")
    srv = Server(model_dir, free_port(), log, engine_args=GPU_ARGS)
    try:
        yield srv.wait_ready(timeout_s=400)
    finally:
        srv.stop()


def test_vllm_serve_over_http(server, tmp_path):
    """`vllm serve` (HTTP dev routes) on the GPU: two pushes; its tokens equal a fresh engine on those weights."""
    model = build_model(seed=0, tied=False, **MODEL).cuda()
    with WeightSync(model, [server.url]) as sync:
        for step in range(2):
            train_step(model, seed=30 + step)
            report = sync.push()
        assert report.engine_apply == "direct"
    assert server.greedy(list(prompts().values()), N) == fresh_tokens(model, tmp_path, "ref-serve")


class _KillOnUpdate(HttpClient):
    """The trainer's client for one engine, which SIGKILLs the engine's process group as soon as the push's
    update call is on its way (the real engine dies mid-push; only the moment is chosen by the test)."""

    def __init__(self, srv: Server, index: int = 0):
        super().__init__(srv.url, 30.0, index)
        self.srv, self.armed = srv, False

    def update(self, info=None):
        if self.armed:
            threading.Timer(0.05, os.killpg, (self.srv.proc.pid, signal.SIGKILL)).start()
        return super().update(info)


def test_engine_killed_mid_push_is_named_quickly(tmp_path_factory):
    model_dir = save_model(str(tmp_path_factory.mktemp("qwen3-kill")), seed=0, tied=False, **MODEL)
    srv = Server(model_dir, free_port(), str(tmp_path_factory.mktemp("kill") / "serve.log"), engine_args=GPU_ARGS)
    try:
        srv.wait_ready(timeout_s=400)
        model = build_model(seed=1, tied=False, **MODEL).cuda()
        client = _KillOnUpdate(srv)
        sync = WeightSync(model, [client], SyncConfig(timeout_s=30))
        try:
            sync.push()
            client.armed = True
            t0 = time.monotonic()
            with pytest.raises(SyncError) as err:
                sync.push()
            took = time.monotonic() - t0
        finally:
            sync.close()
        assert client.name in str(err.value), str(err.value)
        assert took < 15, took
    finally:
        srv.stop()
