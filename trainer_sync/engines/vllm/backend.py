"""The vLLM weight-transfer backend ``trainer_sync``: one instance per vLLM worker (registration.py has vLLM build it).

Lifecycle (driven by the trainer, see trainer_sync/control/push.py), per worker:
  init   ``init_weight_transfer_engine(join_info)``: join the bridging group as receiver
         ``receiver_rank + worker rank`` (each engine gets its own first rank; every TP/PP worker and every engine
         of a data-parallel fleet joins the same group), announcing what the served checkpoint holds.
         One owner at a time: while the trainer that holds the engine is alive (its rendezvous store answers),
         a join from another trainer is refused (EngineHeld) and changes nothing; the owner itself may re-join
         (a new epoch) at any time. The current receiver is replaced only once a new join passed the rendezvous,
         so a refused join (wrong token, say) leaves the owner's group working. The owner releases the engine by
         ``shutdown_weight_transfer_engine`` (WeightSync.close does) or by dying.
  start  ``start_weight_update``: nothing touches the model yet.
  update ``update_weights({})``: take one push. The handshake runs first; only once the trainer's plan is accepted
         does the first batch switch the model into vLLM's layerwise reload (worker.py). So a refused push (names,
         shapes or dtypes that do not match) raises HandshakeMismatch with the model untouched and still serving.
  finish ``finish_weight_update``: finalize the layerwise reload (each layer was already processed, i.e. repacked
         for oneDNN on CPU or re-quantized, as soon as its last tensor arrived).

What this class gets from vLLM, and what it does not: vLLM (0.26 to 0.33) builds it in ``Worker.load_model`` as
``WeightTransferEngineFactory.create_engine(config, vllm_config, device, model_runner.get_model())``, so it holds
the worker's model, device and configs, never the worker itself; and a worker calls into it only from its own
session methods. The one thing only the worker can do is close vLLM's update session of a worker (its
``finish_weight_update``), needed after a trainer died mid-update and left sessions open (``open_session`` below).
That is done through the public route to the worker's own method: the next trainer calls ``finish_weight_update``
on the engine (control/membership.py), told to by what this backend announces when it joins.

A failed join or update is raised by one worker of the engine only, the last, naming every failed worker
(failures.py says why vLLM's executors need that).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferUpdateInfo

from ...codec import scale_name
from ...plan.buckets import dtype_of
from ...plan.handshake import model_facts
from ...errors import EngineHeld, HandshakeMismatch, describe
from ...rank.receiver import Receiver
from ...transport.group import Rendezvous
from ...protocol import wire
from ...protocol.messages import Expected, JoinInfo, Keys, ServedVersion, UpdateSession
from . import compat, failures
from ..checkpoint import expected_tensors, find_checkpoint_dir
from .lora import AdapterInstaller
from .quiet_logs import partial_push
from .shards import engine_shards
from .worker import WeightApplier
# Editable installs made before the entry point moved to registration.py still name backend:register; a pip install
# of the checkout refreshes their metadata, after which nothing imports it from here.
from .registration import register  # noqa: F401

logger = logging.getLogger(__name__)


def serves_block_fp8(expected: dict | None) -> bool:
    """Whether a served checkpoint is block-FP8: some ``x.weight`` is float8 and has its ``x.weight_scale_inv``."""
    return bool(expected) and any(str(dtype).startswith("float8") and scale_name(name) in expected
                                  for name, (_, dtype) in expected.items())


@dataclass
class TrainerSyncUpdateInfo(WeightTransferUpdateInfo):
    """Per-push update info: empty for a push. The plan (names, shapes, dtypes, buckets) arrives over the bridging
    group's store, never through RPC arguments, so the same ``{}`` works for in-process engines and HTTP alike.

    ``catchup``: an engine joining a running job pulls the latest version point to point instead (catchup.py):
    ``{"host", "port", "token", "num_trainers", "timeout_s"}``, the rendezvous it has not joined yet."""

    catchup: dict | None = None


class TrainerSyncWeightTransferEngine(compat.backend_base()):
    init_info_cls = JoinInfo
    update_info_cls = TrainerSyncUpdateInfo
    # Expectations come from the main model's checkpoint; a speculative draft model would need its own.
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.receiver: Receiver | None = None
        self.last = None  # ReceiveResult of the last push
        self.applier = WeightApplier(model, self.model_config, device)  # puts received tensors into the model
        self.lora = AdapterInstaller(model, vllm_config, device)  # a LoRA trainer's adapter, installed in memory
        self._checkpoint_shapes: dict | None = None
        self._plan = None  # the plan of the last push (a TP worker's shards are bound to it)
        self._shards = None  # (receiver, slots, Shards) offered to the receiver (a TP worker's delta destination)
        # This worker's vLLM update session is open (start_weight_update ran, finish_weight_update did not, and
        # vLLM did not close it on a raise): announced when a trainer joins, see _join.
        self.in_session = False
        # The version of the last push this engine applied whole (any trainer's), announced when a trainer joins:
        # vLLM 0.26 keeps no weight version, so this is where a new trainer learns what the engine serves.
        # ``_applied``: this session's push, taken whole by every worker; served from finish_weight_update on.
        self.served_version: int | None = None
        self._applied: int | None = None

    # --- init -------------------------------------------------------------------------------------------------
    def parse_init_info(self, init_dict: dict[str, Any]) -> JoinInfo | None:
        """The trainer's JoinInfo; its ``receiver_rank`` is this engine's first receiver rank. ``compat.LEAVE``
        (None here) asks this worker to leave its group, on releases without vLLM's own shutdown call."""
        if init_dict == compat.LEAVE:
            return None
        return JoinInfo.read(init_dict)

    def worker_index(self) -> int:
        """This worker's index among all workers of its engine, data-parallel replicas included (like vLLM's own
        NCCL backend: dp index * (TP*PP) + rank)."""
        pc = self.parallel_config
        return pc.data_parallel_index * pc.world_size + pc.rank

    def expected(self) -> dict | None:
        mc = self.model_config
        model_dir = find_checkpoint_dir(mc.model, getattr(mc, "revision", None),
                                        getattr(self.vllm_config.load_config, "download_dir", None))
        exp = expected_tensors(model_dir, mc.dtype)
        if exp is None:
            logger.warning("trainer_sync: no safetensors checkpoint found for %s; the handshake cannot check names "
                           "and shapes on this engine", mc.model)
        return exp

    def init_transfer_engine(self, init_info: JoinInfo | None) -> None:
        if init_info is None:  # compat.LEAVE: releases without vLLM's shutdown call
            self.shutdown()
            return
        error = None
        try:
            self._join(init_info)
        except Exception as e:  # noqa: BLE001 - reported once per engine, see _report
            error = e
        self._report(error)

    def _join(self, init_info: JoinInfo) -> None:
        rank = init_info.receiver_rank + self.worker_index()
        if rank >= init_info.num_receivers:
            raise ValueError(f"trainer_sync: worker {self.worker_index()} of an engine starting at receiver rank "
                             f"{init_info.receiver_rank} is rank {rank}, outside the {init_info.num_receivers} "
                             f"receivers the trainer expects (count every engine's TP*PP*DP workers)")
        self._check_owner(init_info.host, init_info.port)
        info = dataclasses.replace(init_info, receiver_rank=rank)
        # gloo carries bytes through host memory: receive there and let load_weights copy to the device.
        device = self.device if info.backend == "nccl" else torch.device("cpu")
        tensors = self.expected()
        # The served model's routing facts that no shape shows (top-k, ...): the trainer refuses a model that differs.
        mc = self.model_config
        facts = model_facts(getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None))
        expected = Expected({n: (tuple(s), d) for n, (s, d) in (tensors or {}).items()}, model=facts) \
            if tensors or facts else None
        # Delta pushes: a mirror of the model in host memory for the CPU engines (layerwise reload). GPU engines keep
        # no mirror (a second copy of the model in GPU memory and a copy per push): once their fast path is proven,
        # the receiver writes pushes, deltas included, straight into its parameter slices (_sync_targets).
        gpu = self.device.type == "cuda"
        receiver = Receiver(info, expected, device=device, dequantize_fp8=self.dequantize_to(info, tensors),
                            delta_mirror=not gpu, adopts_targets=gpu, lora=self.lora.support())
        old = self.receiver
        if old is not None and (old.info.host, old.info.port) == (info.host, info.port):
            receiver.adopt(old)  # the same trainer's new epoch: the delta mirror still holds its last version
        try:
            receiver.connect()
        except BaseException:
            receiver.close()  # the current receiver (if any) stays: a refused join changes nothing
            raise
        # Passed the rendezvous: a re-init (new epoch after a failure, more engines, or a new owner after the
        # last one closed or died) replaces the old group.
        old, self.receiver = self.receiver, receiver
        if old is not None:
            old.close()
        # A session still open here was left by an earlier trainer that died mid-update (a failed update raises
        # from one worker only, see _report, and vLLM closes the session of that worker alone; or the trainer died
        # between start and finish). It can never complete, and vLLM would refuse the new trainer's start on this
        # worker only, leaving the engine's workers out of step. Only the worker's own finish_weight_update closes
        # it, so this worker tells the new trainer, which calls it on the engine before its first push (the workers
        # without an open session refuse that call; the one that raised is the engine's last, whose reply vLLM
        # reads last, so the refusal leaves no reply queued).
        wire.put(receiver.bridge.store, Keys.open_session(rank), UpdateSession(bool(self.in_session)))
        wire.put(receiver.bridge.store, Keys.served_version(rank), ServedVersion(self.served_version))
        if self.in_session:
            logger.warning("trainer_sync: an update session abandoned by an earlier trainer is open on this worker; "
                           "the new trainer closes it (the engine stays paused until a push completes)")
        self.applier.enable_direct(info.engine_apply == "auto")

    def _check_owner(self, host: str, port: int) -> None:
        """Refuse a join from another trainer while the one that holds this engine is alive.

        The owner is the trainer whose rendezvous the current receiver joined. A join naming the same rendezvous
        (host:port) comes from the owner, or from whoever took that address after the owner died; it goes on to
        the rendezvous, which checks the token. Any other join is refused while the owner's store still answers
        on the receiver's connection (a dead owner's connection fails at once, even if a new store took its port).
        Nothing about the owner is said beyond that it exists: its address and token stay private.
        """
        r = self.receiver
        if r is None or r.rdzv is None or r.rdzv.store is None or (r.info.host, r.info.port) == (host, port):
            return
        try:
            r.rdzv.store.check(["trainer_sync/owner-alive"])
        except Exception:  # noqa: BLE001 - the owner's store is gone: it closed or died, the engine is free
            logger.warning("trainer_sync: the trainer that held this engine is gone; a new trainer takes it")
            return
        if Rendezvous.released(r.rdzv.store):  # its last push was refused or failed: it holds nothing it landed
            logger.warning("trainer_sync: the trainer that held this engine released it after a refused or failed "
                           "push; a new trainer takes it")
            return
        raise EngineHeld("trainer_sync: this engine is held by another trainer, which is still alive; it accepts "
                         "a new trainer once that one releases it (WeightSync.close(), or POST "
                         "/shutdown_weight_transfer_engine on the engine) or dies. Nothing was changed on the engine",
                         stage="rendezvous")

    def dequantize_to(self, info: JoinInfo, expected: dict | None) -> torch.dtype | None:
        """FP8 on the wire (the trainer's ``wire_dtype="fp8"``), two cases:

        * this engine serves a bf16/fp32 model: dequantize on arrival into the model dtype (half the bytes of bf16
          on the wire, the engine loads ordinary weights);
        * it serves a block-FP8 checkpoint (float8 weights + ``*_scale_inv``): None, fp8 codes and scales pass
          through in checkpoint format and vLLM's reload path loads them as the checkpoint's own tensors.
        Without safetensors headers to look at, the model config's quantization decides.
        """
        if info.wire_dtype != "fp8":
            return None
        block_fp8 = serves_block_fp8(expected) if expected is not None else \
            getattr(self.model_config, "quantization", None) == "fp8"
        return None if block_fp8 else self.model_config.dtype

    def _report(self, error: BaseException | None, touched: bool | None = None) -> bool:
        """Raise ``error`` (or a sibling worker's) from exactly one worker of this engine (failures.py)."""
        return failures.report(self.parallel_config, error, touched, self.served_version)

    # --- one update -------------------------------------------------------------------------------------------
    def start_weight_update(self) -> None:
        if self.applier.reloading:  # a previous session was abandoned half-way: start from a clean slate
            self.applier.finalize()
        self.in_session = True
        self._applied = None

    def receive_weights(self, update_info: TrainerSyncUpdateInfo) -> None:
        self.applier.touched = False
        if self.receiver is None and not update_info.catchup:
            # Through _report (one worker raises) and marked untouched: the trainer resumes the engine.
            return self._end_update(RuntimeError("trainer_sync: update_weights before init_weight_transfer_engine "
                                                 "(no trainer holds this engine)"))
        if update_info.catchup:
            try:
                self._check_owner(update_info.catchup["host"], update_info.catchup["port"])
            except EngineHeld as e:
                return self._end_update(e)
        error = None
        try:
            with compat.API.mtp_check_disabled():
                if update_info.catchup:
                    self.last = self._catch_up(update_info.catchup)
                else:
                    self.receiver.note = {"engine_apply": self.applier.how}
                    if self._shards is not None and self._shards[0] is self.receiver:
                        self._shards[2].combine.begin(Keys.push(self.receiver.seq))  # this push's key prefix
                    self.last = self.receiver.receive(self._apply, on_plan=self._prepare_direct)
        except HandshakeMismatch as e:
            # Raised before the first batch: the model was never touched and keeps serving its weights.
            error = e
        except Exception as e:  # noqa: BLE001 - reported once per engine, see _report
            # Tell the trainer ranks at once (they would otherwise wait for this receiver until their timeout), then
            # reset the layerwise state so that the next push starts clean; the trainer keeps this engine paused
            # until a push succeeds.
            # vLLM passes on str(error) alone: an error without a message (a bare assert in a loader) says where.
            error = e if str(e) else RuntimeError(describe(e))
            if self.receiver is not None and not update_info.catchup:
                self.receiver.fail(e)
            self.applier.reset()
            self.lora.abandon()
        self._end_update(error, self.last.version if error is None else None)

    def _end_update(self, error: BaseException | None, version: int | None = None) -> None:
        try:
            whole = self._report(error, self.applier.touched)
        except BaseException:
            self.in_session = False  # vLLM ends the session of a worker whose update_weights raised
            raise
        self._applied = version if whole else None  # served once finish_weight_update completes

    def _apply(self, batch) -> None:
        """One round of a push: a LoRA adapter's tensors to the adapter installer (lora.py), the rest to the model."""
        if self.lora.offer is not None:
            dense = []
            for name, t in batch:
                if t is not None and self.lora.wants(name):
                    self.lora.take(name, t)
                else:
                    dense.append((name, t))
            if not dense:
                return
            batch = dense
        self.applier.apply(batch)

    def _prepare_direct(self, plan) -> None:
        """Before the first batch of a push: let the fast path learn where the tensors go (once). The served
        checkpoint says which tensors the model loads; without one, the trainer's plan does (dummy weights)."""
        self.lora.begin(self.receiver.lora_offer)
        self._plan = plan
        if self._checkpoint_shapes is None:
            exp = self.expected()
            self._checkpoint_shapes = {n: (tuple(s), getattr(torch, d) if isinstance(d, str) else d)
                                       for n, (s, d) in exp.items()} if exp else {}
        shapes = self._checkpoint_shapes
        if not shapes and self.receiver.fp8 is None:
            shapes = {n: (t.shape, dtype_of(t.dtype)) for t in plan.tensors.values() for n in (t.name, *t.aliases)
                      if not self.lora.wants(n)}
        self.applier.prepare(shapes)
        if self.applier.how != "direct":  # before anything is written: the slices are no delta destination now
            self._sync_targets()
        self.receiver.note = {"engine_apply": self.applier.how}

    def _sync_targets(self) -> None:
        """Keep the receiver's delta destination in step with the fast path (after every push, and before one that
        will not take the fast path): while it is armed, the receiver writes pushes (deltas too) straight into its
        whole parameter slices, no mirror and no extra copy; otherwise it holds no targets, pushes go full and the
        trainer's ``full_reason`` says why (``for_good``: the fast path will never offer them, so the trainer stops
        caching pushes for this worker)."""
        r = self.receiver
        if r is None or not r.adopts():
            return
        if r.fp8 is not None:
            r.drop_targets("fp8 on the wire is dequantized on arrival (a delta needs the served bytes)", for_good=True)
            return
        if self.parallel_config.world_size > 1:
            targets, why, for_good = self._engine_shards()
        else:
            targets, why, for_good = self.applier.delta_targets()
        if targets is not None:
            r.adopt_targets(targets)
        else:
            r.drop_targets(why, for_good=for_good)

    def _engine_shards(self):
        """A worker of a TP/PP engine holds part of each tensor: its delta destination is its shards, checked with
        the engine's other workers (shards.py). Built once per bridging group and placement (the same object while
        they stand, so offering it again changes nothing)."""
        held, why, for_good = self.applier.delta_pieces()
        if held is None or self._plan is None:
            return None, why or "no push was received yet", for_good
        slots, r = self.applier.direct.slots, self.receiver
        if self._shards is not None and self._shards[0] is r and self._shards[1] is slots:
            return self._shards[2], "", False
        pc = self.parallel_config
        first = r.info.receiver_rank - pc.rank
        shards, why = engine_shards(held, self._plan, r.bridge.store, first, pc.world_size, pc.rank,
                                    r.info.timeout_s)
        if shards is None:
            return None, why, False
        self._shards = (r, slots, shards)
        return shards, "", False

    def _catch_up(self, where: dict):
        """Pull the trainer's latest complete version from every trainer rank at once (a joining engine)."""
        from ...rank.catchup import pull_latest
        from ...rank.receiver import ReceiveResult

        if self.receiver is not None:  # the slices change outside the bridging group: no delta base any more
            self.receiver.drop_targets("it caught up from a kept snapshot outside its bridging group")
        expected = self.expected()
        exp = Expected({n: (tuple(s), d) for n, (s, d) in expected.items()}) if expected else None
        version = pull_latest(where["host"], where["port"], where["token"], where["num_trainers"], self.applier.apply,
                              expected=exp, timeout_s=where.get("timeout_s", 120.0))
        return ReceiveResult(version, 0, 0.0, 0.0)

    def finish_weight_update(self) -> None:
        self.in_session = False
        offer = self.receiver.lora_offer if self.receiver is not None else None
        with partial_push(offer is not None and (offer.partial or offer.mode == "adapter")):
            self.applier.finish()
        self.lora.finish()
        if self._applied is not None:
            self.served_version, self._applied = self._applied, None
        self._sync_targets()

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
