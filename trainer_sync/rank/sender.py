"""Sender: the trainer side of the core data path (every trainer rank holds one).

One push: publish this rank's pieces -> rank 0 plans and checks the plan against every receiver's expectations ->
all ranks send their buckets through the pipeline -> wait for every receiver's acknowledgement. Nothing is sent when
the handshake fails, and the push only returns once every receiver has applied everything.
"""
from __future__ import annotations

import dataclasses
import secrets
import time

import torch
import torch.distributed as dist

from .catchup import CatchUpServer, Snapshot
from .delta_push import DeltaPushes, report_fields
from .lora_push import LoraPushes
from ..config import SyncConfig
from ..errors import Aborted, Deadline, HandshakeMismatch, SyncError
from ..pipeline.loops import BufferPool, gc_paused, send
from ..pipeline.verdict import VerdictRound
from ..plan.buckets import LocalPiece, PlanCache, PlanError, fit_budget, itemsize, merge_pieces, plan_buckets
from ..plan.handshake import check_model, check_plan, model_facts, resolve_wire_dtypes, wants_block_fp8
from ..protocol import wire
from ..protocol.messages import Ack, Expected, JoinInfo, Keys, Pieces, PlanOffer, PlanRefusal, WireFp8Decision
from ..protocol.report import SyncReport
from ..sources import Source, make_source
from ..codec.fp8_source import Fp8Source
from ..transport import SendTransport, cuda, open_send
from ..transport.group import BridgeGroup, Member, Rendezvous, abort_reason, wait_keys
from ..transport.layout import agree_layout


def _share_from_rank0(values: list, world: int) -> list:
    """Rank 0's values on every trainer rank (through the trainer's own default group, if there is one)."""
    if world > 1:
        if not dist.is_initialized():
            raise SyncError("trainer_sync: several trainer ranks but no default process group to agree on the "
                            "rendezvous port and token", stage="rendezvous")
        dist.broadcast_object_list(values, src=0)
    return values


class Sender:
    def __init__(self, model: torch.nn.Module | Source, config: SyncConfig | None = None, *,
                 rank: int | None = None, world: int | None = None):
        self.config = config or SyncConfig()
        self.source = model if isinstance(model, Source) else make_source(model, self.config.rename, rank=rank,
                                                                           world=world)
        if self.config.wire_dtype == "fp8" and not isinstance(self.source, Fp8Source):
            # eligible weights (config.fp8_rules) go block-quantized (codec/)
            self.source = Fp8Source(self.source, self.config.fp8_rules)
        self.rank, self.world = self.source.rank, self.source.world
        # What the engines' models must agree on beyond the tensors (an MoE layer's routing): checked at the plan.
        self.model_facts = model_facts(getattr(self.source.model, "config", None))
        cfg = self.config
        if cfg.mode == "ipc":
            cuda.require(self.source.device, f"trainer rank {self.rank}")
        token = cfg.resolved_token()
        port = cfg.port
        if self.rank == 0:
            token = token or secrets.token_hex(16)
            self.rdzv = Rendezvous(cfg.host, port, token, is_server=True, timeout_s=cfg.timeout_s)
            port = self.rdzv.port
        port, token = _share_from_rank0([port, token], self.world)
        if self.rank != 0:
            self.rdzv = Rendezvous(cfg.host, port, token, is_server=False, timeout_s=cfg.timeout_s)
        # NCCL for CUDA tensors: hops between two processes on one GPU go by CUDA IPC and stay out of the groups.
        self.backend = cfg.backend or ("nccl" if self.source.device.type == "cuda" else "gloo")
        self.transport: SendTransport | None = None  # of the current epoch (transport/__init__.py: open_send)
        self.pool = BufferPool(self.source.device)
        self.bridge: BridgeGroup | None = None
        self.epoch = -1
        self.num_receivers = 0
        self.seq = 0
        self.version = 0
        self._expected: list[Expected] | None = None
        self._auto_wrapped = False  # wire_dtype "auto" wrapped the source in an Fp8Source (see _auto_fp8)
        self._plans = PlanCache()
        # Delta pushes (delta_push.py): this rank's last pushed wire bytes, and rank 0's view of the receivers.
        self.delta = DeltaPushes(cfg.delta, cfg.delta_cache_bytes)
        self._last_plan: tuple[tuple, dict] | None = None  # rank 0: ((every rank's pieces, LoRA state), plan message)
        # A PEFT LoRA model (lora_push.py): rank 0 picks adapter or merged tensors per push.
        self.lora = LoraPushes(cfg, self.source)
        # Dynamic clusters: keep the latest version for joiners and serve them from a thread (catchup.py).
        self.snapshot: Snapshot | None = None
        self.catchup: CatchUpServer | None = None
        if cfg.keep_latest:
            budget = None if cfg.keep_latest_mb is None else int(cfg.keep_latest_mb * 2**20)
            self.snapshot = Snapshot(budget)
            self.catchup = CatchUpServer(self.rdzv, self.rank, self.world, self.snapshot, cfg.timeout_s)

    def join_info(self, receiver_rank: int, num_receivers: int | None = None) -> JoinInfo:
        """Join info for receiver ``receiver_rank`` of the next ``connect(num_receivers)``."""
        n = num_receivers or self.num_receivers
        cfg = self.config
        return JoinInfo(self.rdzv.host, self.rdzv.port, self.rdzv.token, self.epoch + 1, self.world, n,
                        receiver_rank, self.backend, cfg.timeout_s, cfg.bucket_timeout_s, cfg.push_timeout_s,
                        cfg.wire_dtype, cfg.engine_apply,
                        None if cfg.fp8_rules is None else cfg.fp8_rules.to_dict(), cfg.delta, cfg.delta_mirror_mb)

    def connect(self, num_receivers: int) -> None:
        """Form the bridging group of a new epoch with ``num_receivers`` receivers (blocks until they join)."""
        self.close_group()
        self.epoch += 1
        self.num_receivers = num_receivers
        self.seq = 0
        self._expected = None
        self._last_plan = None
        self.delta.connected()
        self.lora.connected()
        me, cfg = Member("trainer", self.rank), self.config
        # Everyone reports its GPU; receivers on this rank's GPU get its buckets by CUDA IPC (transport/layout.py).
        self.bridge = BridgeGroup(self.rdzv, me, self.epoch, self.world, num_receivers, self.backend, cfg.timeout_s,
                                  decide=lambda store: agree_layout(store, me, cfg.mode,
                                                                    cuda.device_uuid(self.source.device), self.world,
                                                                    num_receivers, self.backend, cfg.timeout_s))
        self.transport = open_send(self.bridge, self.rank, self.source.device, self.pool, cfg.timeout_s,
                                   cfg.ipc_direct)
        if self.config.wire_dtype == "auto":
            self._auto_fp8()

    def _auto_fp8(self) -> None:
        """``wire_dtype="auto"``: send block-FP8 (fp8 + scales, checkpoint format) when the receivers of this epoch
        serve a block-FP8 model, as they said when they joined; else the dtypes they expect. Rank 0 reads their
        expectations and decides; every rank wraps or unwraps its source the same way (codec/fp8_source.py)."""
        if self.rank == 0:
            self._wait([Keys.expected(j) for j in range(self.num_receivers)], "expectations",
                       lambda k: f"receiver {k.rsplit('/', 1)[1]}")
            self._expected = [self._expectation(j) for j in range(self.num_receivers)]
            wire.put(self.bridge.store, Keys.WIRE_FP8, WireFp8Decision(wants_block_fp8(self._expected)))
        self._wait([Keys.WIRE_FP8], "the wire dtype", lambda k: "trainer rank 0")
        fp8 = wire.read(self.bridge.store, Keys.WIRE_FP8, WireFp8Decision, stage="handshake").fp8
        if fp8 and not isinstance(self.source, Fp8Source):
            self.source = Fp8Source(self.source, self.config.fp8_rules)
            self._auto_wrapped = True
        elif not fp8 and self._auto_wrapped:
            self.source = self.source.inner
            self._auto_wrapped = False

    def _wait(self, keys: list[str], what: str, who, deadline: Deadline | None = None,
              abort_key: str | None = None) -> None:
        stage = "handshake" if what != "acknowledgement" else "apply"
        timeout_s = (deadline or Deadline(self.config.timeout_s)).left(f"trainer rank {self.rank}: waiting for {what}",
                                                                      stage)
        # abort_key: poll (at most 1 ms apart), so that a receiver or engine that gave up stops this wait at once.
        missing = wait_keys(self.bridge.store, keys, timeout_s, abort_key=abort_key, stage=stage, max_pause_s=1e-3)
        if missing:
            names = ", ".join(who(k) for k in missing)
            raise SyncError(f"trainer rank {self.rank}: no {what} from {names} within {timeout_s:g}s",
                            stage="handshake" if what != "acknowledgement" else "apply", who=names)

    def _expectation(self, j: int) -> Expected:
        """What receiver ``j`` said it expects when it joined (nothing: it checks nothing)."""
        return wire.read(self.bridge.store, Keys.expected(j), Expected, stage="handshake")

    def _plan(self, p: str, version: int) -> PlanOffer | PlanRefusal:
        """Rank 0: merge every rank's pieces, plan, check against the receivers; publish the verdict."""
        cfg, bridge = self.config, self.bridge
        self._wait([Keys.pieces(p, r) for r in range(self.world)], "metadata",
                   lambda k: f"trainer rank {k.rsplit('/', 1)[1]}")
        if self._expected is None:
            self._wait([Keys.expected(j) for j in range(self.num_receivers)], "expectations",
                       lambda k: f"receiver {k.rsplit('/', 1)[1]}")
            self._expected = [self._expectation(j) for j in range(self.num_receivers)]
        raw = [bridge.store.get(Keys.pieces(p, r)) for r in range(self.world)]
        key = (raw, self.lora.state())
        if self._last_plan is not None and self._last_plan[0] == key:
            return dataclasses.replace(self._last_plan[1], version=version)  # same tensors as last push: same plan
        pieces, errors = [], []
        for r, text in enumerate(raw):
            msg = wire.decode(text, Pieces, stage="handshake")
            pieces += [LocalPiece(n, tuple(s), d, a, b, r) for n, s, d, a, b in msg.pieces]
            errors += [f"trainer rank {r}: {n} holds NaN or Inf" for n in msg.nonfinite]
        offer, adapter_names, stated = None, frozenset(), [e for e in self._expected if e.tensors]
        if self.lora.active:  # a PEFT LoRA model: adapter or merged tensors (plan/lora.py), refused before a byte moves
            supports = [self.lora.read_support(bridge, j) for j in range(self.num_receivers)]
            pieces, offer, refusals, refused = self.lora.choose(pieces, self._expected, supports)
            if refusals:
                return PlanRefusal(errors + refusals, refused)
            adapter_names = self.lora.adapter_names(pieces)
            stated += self.lora.wire_expected(pieces, supports)
        try:
            meta, _ = merge_pieces(pieces)
            wire_dtypes = resolve_wire_dtypes(meta, cfg.wire_dtype, stated)
            largest = max((x.numel * itemsize(wire_dtypes[x.name]) for x in pieces), default=0)
            fit = fit_budget(cfg.bucket_bytes, cfg.num_buffers, largest, cfg.memory_budget_bytes, self.world)
            plan = plan_buckets(pieces, self.world, fit.bucket_bytes, wire_dtypes, self.source.aliases)
        except PlanError as e:
            return PlanRefusal([str(e)])
        refused_by = []
        for j, exp in enumerate(self._expected):
            if exp.tensors or exp.model:
                found = check_model(self.model_facts, exp, f"receiver {j}") + \
                    check_plan(plan, exp, f"receiver {j}", partial=offer is not None, ignore=adapter_names)
                errors += found
                refused_by += [j] if found else []
        if errors:
            return PlanRefusal(errors, refused_by)
        msg = PlanOffer(plan.to_json(), fit.num_buffers, version, fit.fallback, lora=offer)
        self._last_plan = (key, msg)
        return msg

    def push(self, version: int | None = None) -> SyncReport:
        with gc_paused():
            try:
                return self._push(version)
            finally:
                self.delta.abandon()  # no-op after a commit; after a failure, the buckets it overwrote go full next
                if self.snapshot is not None:
                    self.snapshot.abandon()  # no-op after a commit; after a failure, nothing half-written is served

    def _push(self, version: int | None) -> SyncReport:
        """Send the current weights to every receiver as ``version`` (default: last version + 1).

        Called on every trainer rank together. Returns once every receiver acknowledged; raises HandshakeMismatch
        (nothing sent) or SyncError naming the peer and stage.
        """
        if self.bridge is None:
            raise SyncError("trainer_sync: no bridging group (push() before connect(), or after a failed push)",
                            stage="handshake")
        version = self.version + 1 if version is None else int(version)
        if version <= self.version:
            raise ValueError(f"trainer_sync: version {version} is not newer than the last pushed ({self.version})")
        cfg, bridge = self.config, self.bridge
        t0 = time.perf_counter()
        deadline = Deadline(cfg.timeout_s, cfg.push_timeout_s)
        p = Keys.push(self.seq)
        self.seq += 1
        # Anyone who gives up on this push (a receiver whose apply failed, WeightSync for an engine whose update
        # call failed) writes why under this key; every wait below stops on it (Sender.abort_push).
        abort_key = Keys.abort(p)
        store = bridge.store

        def aborted() -> str | None:
            return abort_reason(store, abort_key)

        bad = self.source.nonfinite() if cfg.check_finite else []
        store.set(Keys.pieces(p, self.rank), wire.encode(Pieces(
            [[x.name, list(x.shape), x.dtype, x.start, x.numel] for x in self.source.pieces()], bad)))
        if self.rank == 0:
            store.set(Keys.plan(p), wire.encode(self.delta.annotate(self._plan(p, version), store,
                                                                    self.num_receivers, bridge.layout, self.version)))
        self._wait([Keys.plan(p)], "plan", lambda k: "trainer rank 0", deadline, abort_key)
        msg = wire.decode(store.get(Keys.plan(p)), PlanOffer, PlanRefusal, stage="handshake")
        if isinstance(msg, PlanRefusal):
            raise HandshakeMismatch(msg.lines, msg.receivers)
        plan = self._plans.parse(msg.plan)
        t_plan = time.perf_counter() - t0
        group = bridge.groups.get(self.rank)  # None when every receiver is on this rank's GPU
        wire_deadline = Deadline(cfg.bucket_timeout_s or cfg.timeout_s, cfg.push_timeout_s, abort=aborted)
        # A rank whose push goes by CUDA IPC packs nothing complete to keep (its transport does not serve catch-up),
        # so it never commits and a joiner is told that no complete version is kept (rather than served an old one).
        snapshot = self.snapshot if self.snapshot is not None and self.transport.serves_catchup else None
        if self.snapshot is not None:
            self.snapshot.begin()  # invalid until commit
        failed = None
        # full, or as deltas (codec/delta/codec.py) when every receiver holds the last version (CUDA IPC: always
        # full): the same send loop either way, the codec made from rank 0's decision
        codec, dstats = self.delta.codec_for(plan, msg, any(bridge.layout.local), self.rank)
        if snapshot is not None and codec.verdict:  # a delta push: its frames also serve a joiner one version behind
            snapshot.delta_from(codec.decision.base)
        try:
            wire_deadline.check()
            times = send(plan, self.source, self.transport, msg.num_buffers, wire_deadline, p,
                         snapshot.keep if snapshot is not None else None, codec,
                         VerdictRound(store, p, self.num_receivers, cfg.timeout_s, abort_key,
                                      f"trainer rank {self.rank}"))
        except SyncError as e:
            if group is None:  # all by IPC: no group to shut down, and the error already names the peer
                raise
            failed = e if isinstance(e, Aborted) else str(e)
        if isinstance(failed, Aborted):  # someone said why: no need to find out who stalled
            reason, failed = (str(failed), failed.stage), None
            del bridge, group
            self.close_group(in_background=True)
            raise Aborted(reason[0], stage=reason[1])
        if failed is not None:  # handled outside the except block: its traceback would keep the group alive
            del bridge, group
            raise self._name_stalled(p, failed)
        self._wait([Keys.done(p, j) for j in range(self.num_receivers)], "acknowledgement",
                   lambda k: f"receiver {k.rsplit('/', 1)[1]}", deadline, abort_key)
        acks = [wire.decode(store.get(Keys.done(p, j)), Ack, stage="apply") for j in range(self.num_receivers)]
        failed = [j for j, a in enumerate(acks) if a.failed]
        if failed:
            raise SyncError("trainer_sync push failed on the receiving side:\n  " +
                            "\n  ".join(f"receiver {j}: {acks[j].error.message}" for j in failed),
                            stage="apply", who=f"receiver {failed[0]}", receivers=failed,
                            parameter=acks[failed[0]].error.parameter)
        self.transport.after_push()
        self.delta.acknowledged(acks)
        self.delta.commit(version)
        self.lora.acknowledged(msg.lora)
        delta = report_fields(store, p, self.world, self.rank, dstats, cfg.timeout_s)
        if snapshot is not None:
            snapshot.commit(msg.plan, version, {b.index for b in plan.buckets if b.src == self.rank})
        if self.rank == 0 and self.seq >= 2:
            self._forget(self.seq - 2)
        self.version = version
        wire_dtypes = sorted({t.dtype for t in plan.tensors.values()})
        return SyncReport(version, self.seq - 1, plan.total_bytes, len(plan.buckets), self.num_receivers, t_plan,
                          times.pack, times.transfer, max(a.apply_s for a in acks), time.perf_counter() - t0,
                          msg.fallback, ",".join(wire_dtypes),
                          ",".join(sorted({a.engine_apply for a in acks if a.engine_apply})), **delta,
                          **self.lora.report(msg.lora))

    def abort_push(self, seq: int, reason: str) -> None:
        """Give up on push number ``seq`` (from any thread): every trainer rank's and receiver's wait in it stops
        with ``reason``. WeightSync calls it when an engine's update call fails, so that no rank waits out its
        timeout for receivers that will never take the push."""
        bridge = self.bridge
        if bridge is not None:
            try:
                bridge.store.set(Keys.abort(Keys.push(seq)), reason)
            except Exception:  # noqa: BLE001 - the store is gone: the push fails on its own then
                pass

    def abort_epoch(self, epoch: int, reason: str) -> None:
        """Give up on forming bridging-group epoch ``epoch`` (an engine's init failed; from any thread)."""
        try:
            self.rdzv.abort(epoch, reason)
        except Exception:  # noqa: BLE001 - see abort_push
            pass

    def _name_stalled(self, p: str, error: str) -> SyncError:
        """After a failed transfer, tell which receivers are at fault.

        This rank's group is broken now anyway: shutting it down makes every live receiver's pending receive fail at
        once, and such a receiver acknowledges with an error; the ones that say nothing are stalled or gone. The
        bridging group has to be formed again (``connect``) before the next push.
        """
        store = self.bridge.store
        self.close_group(in_background=True)
        keys = [Keys.done(p, j) for j in range(self.num_receivers)]
        silent = wait_keys(store, keys, min(5.0, self.config.timeout_s))
        if not silent:
            return SyncError(error, stage="transfer")
        names = ", ".join(f"receiver {k.rsplit('/', 1)[1]}" for k in silent)
        return SyncError(f"trainer rank {self.rank}: transfer failed; {names} stalled or gone ({error})",
                         stage="transfer", who=names)

    def _forget(self, seq: int) -> None:
        """Drop a finished push's keys so that the store stays small over thousands of pushes."""
        p = Keys.push(seq)
        for key in [Keys.plan(p)] + [Keys.pieces(p, r) for r in range(self.world)] + \
                   [Keys.done(p, j) for j in range(self.num_receivers)] + \
                   [Keys.delta_ack(p, j) for j in range(self.num_receivers)] + \
                   [Keys.delta_stats(p, r) for r in range(self.world)] + \
                   [Keys.ipc(p, r) for r, local in enumerate(self.bridge.layout.local) if local]:
            self.bridge.store.delete_key(key)

    def close_group(self, in_background: bool = False) -> None:
        if self.transport is not None:  # first: it holds this rank's group, which the bridge shuts down
            self.transport.close()
            self.transport = None
        if self.bridge is not None:
            self.bridge.close(in_background)
            self.bridge = None

    def close(self) -> None:
        if self.catchup is not None:
            self.catchup.close()
            self.catchup = None
        self.close_group()
        self.rdzv.close()
