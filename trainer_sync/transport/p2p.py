"""Point to point: a trainer rank and one joining engine on a two-member gloo group (the catch-up of catchup.py).

Why not the bridging groups: a broadcast needs every member present when it starts, and a joiner arrives while the
trainer is training. So each trainer rank serves its kept buckets to the joiner over a group of their own, formed
for that one join in the join's store namespace (``pair{r}/``: trainer rank r is group rank 0, the joiner 1), and
the joiner receives from every trainer rank at once. gloo always: the kept buckets are in host memory.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from ..plan.buckets import Bucket
from .base import RecvTransport
from .group import make_group

TRAINER, JOINER = 0, 1  # group ranks in every pair group


def pair_group(namespace: dist.Store, trainer_rank: int, me: int, timeout_s: float, host: str):
    """The two-member group of trainer rank ``trainer_rank`` and the joiner; ``me`` is TRAINER or JOINER."""
    return make_group(dist.PrefixStore(f"pair{trainer_rank}/", namespace), me, 2, "gloo", timeout_s, host)


def send_buckets(group, buckets: list[tuple[Bucket, torch.Tensor]], timeout_s: float) -> None:
    """Send every ``(bucket, bytes)`` to the joiner, tagged with the bucket's index.

    Every send is posted at once (the caller keeps the bytes unchanged until this returns): gloo streams them in
    order as the joiner posts its receives, with no round trip per bucket."""
    works = [group.send([data], JOINER, b.index) for b, data in buckets]
    for work in works:
        work.wait(timedelta(seconds=timeout_s))


class PairRecv(RecvTransport):
    """The joiner's side: each bucket is received from its trainer rank's pair group (``groups``: trainer rank ->
    group), matched by the bucket's index as tag."""

    def __init__(self, groups: dict):
        self.groups = groups

    def post(self, bucket: Bucket, buf: torch.Tensor):
        return self.groups[bucket.src].recv([buf], TRAINER, bucket.index)

    def close(self) -> None:
        for group in self.groups.values():
            group.abort()
        self.groups = {}
