"""Core data-path demo (CPU): 2 trainer ranks -> 2 receiver processes over a gloo bridging group.

    python recipes/core_demo.py [--pushes 5] [--mb 64]

Each trainer rank takes an SGD step, then pushes; receivers copy what arrives into their own copy of the model and
the demo checks bit-for-bit equality after the last push. Prints the per-stage timings of every push.
"""
from __future__ import annotations

import argparse

import torch


from trainer_sync import Receiver, Sender, SyncConfig
from trainer_sync.testing.local_cluster import free_port, run_roles


def model(mb: float) -> torch.nn.Module:
    torch.manual_seed(0)
    width = int((mb * 2**20 / 4 / 8) ** 0.5)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(8)])


def trainer(rank, world, port, pushes, mb):
    net = model(mb)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    sender = Sender(net, SyncConfig(port=port if rank == 0 else 0, token="demo", bucket_mb=8))
    sender.connect(num_receivers=2)
    lines = []
    for step in range(pushes):
        net(torch.randn(4, net[0].in_features)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        lines.append(str(sender.push()))
    sender.close()
    return lines, {k: v.clone() for k, v in net.state_dict().items()}


def receiver(j, n, info, pushes, mb):
    mine = {k: v for k, v in model(mb).state_dict().items()}
    r = Receiver(info)
    r.connect()
    for _ in range(pushes):
        r.receive(lambda batch: [mine[name].copy_(t) for name, t in batch])
    r.close()
    return mine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pushes", type=int, default=5)
    ap.add_argument("--mb", type=float, default=64)
    args = ap.parse_args()
    port = free_port()
    infos = [dict(host="127.0.0.1", port=port, token="demo", epoch=0, num_trainers=2, num_receivers=2,
                  receiver_rank=j, backend="gloo", timeout_s=120.0) for j in range(2)]
    res = run_roles([("trainer", r, 2, trainer, (port, args.pushes, args.mb)) for r in range(2)]
                    + [("receiver", j, 2, receiver, (infos[j], args.pushes, args.mb)) for j in range(2)], timeout=600)
    lines, want = res[("trainer", 0)]
    print("\n".join(lines))
    for j in range(2):
        got = res[("receiver", j)]
        assert all(torch.equal(got[k], v) for k, v in want.items()), f"receiver {j} differs"
    print("both receivers hold the trainer's weights bit for bit")


if __name__ == "__main__":
    main()
