"""Which hop goes by which transport (transport/layout.py): pure decisions from the GPUs every member reports."""
import pytest

from trainer_sync.transport.layout import Layout, plan_layout


def test_one_gpu_for_all_is_ipc_only():
    lay = plan_layout("auto", ["GPU-a"], ["GPU-a"], "nccl")
    assert lay.mode == "ipc" and lay.local == ((0,),) and lay.remote(0) == ()


def test_separate_gpus_or_cpu_is_broadcast():
    assert plan_layout("auto", ["GPU-a"], ["GPU-b"], "nccl").mode == "broadcast"
    assert plan_layout("auto", ["", ""], ["", ""], "gloo").mode == "broadcast"  # CPU processes
    two = plan_layout("auto", ["GPU-a", "GPU-a"], ["GPU-b"], "gloo")
    assert two.mode == "broadcast" and two.remote(1) == (0,)


def test_fsdp_over_two_gpus_engine_on_one_of_them_is_mixed():
    """FSDP2 on a and b, the engine worker colocated on a: rank 0's shard by IPC, rank 1's through its group."""
    lay = plan_layout("auto", ["GPU-a", "GPU-b"], ["GPU-a"], "nccl")
    assert lay.mode == "mixed"
    assert lay.local == ((0,), ()) and lay.remote(0) == () and lay.remote(1) == (0,)
    assert lay.local_srcs(0) == (0,)


def test_engine_per_gpu_each_maps_its_own_rank():
    lay = plan_layout("ipc", ["GPU-a", "GPU-b"], ["GPU-b", "GPU-a"], "nccl")
    assert lay.local == ((1,), (0,)) and lay.remote(0) == (0,) and lay.remote(1) == (1,)
    assert [lay.local_srcs(j) for j in range(2)] == [(1,), (0,)]
    assert Layout.from_json(lay.to_json()) == lay


def test_explicit_ipc_needs_every_receiver_colocated():
    with pytest.raises(ValueError, match=r"receiver 1 is on GPU-c .*trainer ranks: 0 on GPU-a, 1 on GPU-b"):
        plan_layout("ipc", ["GPU-a", "GPU-b"], ["GPU-a", "GPU-c"], "nccl")
    with pytest.raises(ValueError, match="receiver 0 is on no GPU"):
        plan_layout("ipc", [""], [""], "gloo")


def test_nccl_cannot_hold_two_ranks_of_one_gpu():
    # broadcast asked for, but trainer rank 0 and receiver 0 share a GPU: NCCL would fail late and obscurely
    with pytest.raises(ValueError, match="trainer rank 0 and receiver 0 are on GPU-a .*mode='auto' or 'ipc'"):
        plan_layout("broadcast", ["GPU-a", "GPU-b"], ["GPU-a"], "nccl")
    # two engines on one GPU that is not the trainer rank's: both in its group
    with pytest.raises(ValueError, match="receiver 0 and receiver 1 are on GPU-c .*GPU of its own"):
        plan_layout("auto", ["GPU-a"], ["GPU-c", "GPU-c"], "nccl")
    # gloo groups may hold them (CPU tensors)
    assert plan_layout("broadcast", ["GPU-a"], ["GPU-a"], "gloo").mode == "broadcast"
