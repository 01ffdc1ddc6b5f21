"""WeightSync: the one object a trainer uses to put its current weights into any number of vLLM engines.

    sync = WeightSync(model, engines=[llm, "http://host:8000"], config=SyncConfig())
    report = sync.push()   # every trainer rank, after the optimizer step
    sync.close()

Who does what: every trainer rank sends its own share of the weights (a Sender each); only trainer rank 0 talks to
the engines. One push, as rank 0 drives it:

    pause every engine (config.pause_mode) -> start_weight_update
    -> update_weights on every engine, each from a thread (it blocks until that engine received everything),
       while every trainer rank sends its buckets
    -> per engine: finish_weight_update(version) -> reset the prefix cache -> resume

The other ranks learn what rank 0 saw through two tiny broadcasts per push on the trainer's default group (one
after the engines were started, one at the end), so all ranks return the same result or raise the same error, and
no rank is left waiting in a collective for a rank that already gave up.

Failure rules: a refused handshake (names / shapes / dtypes) raises HandshakeMismatch before any byte moves; the
engines never touched their models, so they are resumed on their old weights. Any other failure raises SyncError
naming the engine and the stage; an engine whose update did not complete stays paused (its model may be half
updated) until a later push succeeds, and that push first rebuilds the bridging group (a new epoch) with every
engine. An engine that says its update failed before any weight was applied (its ErrorInfo's kind is
``untouched``) is resumed at once.

Ownership and versions: an engine has one owner (engines/vllm/ refuses another trainer's join while the owner is
alive). The weight version an engine reports never goes backwards by default: ``push()`` without a version continues
from the highest version any engine reports (a trainer taking over an engine that served version 3 pushes 4). Only
an explicit ``push(version=v)`` (the training-loop hooks pass the global step) may set a lower one, with a warning.
"""
from __future__ import annotations

import threading

import torch

from ..config import SyncConfig
from ..rank.sender import Sender
from ..engines.clients import EngineCallError, EngineClient, make_client
from ..metrics.tensorboard import SyncMetrics
from .agreement import Agreement
from .membership import Membership
from .push import PushMachine


class WeightSync(Agreement, Membership, PushMachine):
    """Push a trainer's weights into vLLM engines that run the ``trainer_sync`` weight-transfer backend.

    ``engines``: ``vllm.LLM`` objects and base URLs of ``vllm serve`` processes, mixed (only rank 0's list is used;
    other ranks may pass None). Builds the bridging group right away, so a wrong URL or an engine without the
    backend fails here rather than at the first push.
    """

    def __init__(self, model: torch.nn.Module, engines: list | None = None, config: SyncConfig | None = None, *,
                 rank: int | None = None, world: int | None = None):
        self.config = config or SyncConfig()
        self.sender = Sender(model, self.config, rank=rank, world=world)
        self.rank, self.world = self.sender.rank, self.sender.world
        engines = list(engines or [])
        if self.rank == 0 and not engines:
            self.sender.close()
            raise ValueError("trainer_sync: WeightSync needs at least one engine on trainer rank 0")
        self.clients: list[EngineClient] = [make_client(e, i, self.config.timeout_s) for i, e in enumerate(engines)] \
            if self.rank == 0 else []
        self.num_receivers = 0
        # The highest weight version the engines reported at the last connect (every rank): push() continues above.
        self.engine_version = 0
        self._constructing = True  # an unreachable engine fails the construction; later it leaves the membership
        self.receiver_names: list[str] = []  # rank 0: receiver rank -> "engine i (...) worker w", for errors
        self.receiver_engines: list[str] = []  # rank 0: receiver rank -> the name of its engine
        self.stale = True  # the bridging group must be (re)built before the next push; same value on every rank
        self.released = False  # after a refused or failed push, until one lands (control/push.py _release)
        # Membership (rank 0): the version each engine acknowledged, and engines that joined by catch-up and enter
        # the broadcast group at the next push (add_engine may run in another thread while training goes on).
        self.served: dict[str, str | None] = {}
        self._joined: list[EngineClient] = []
        self._joined_lock = threading.Lock()
        try:
            self._connect()
        except BaseException:
            self.sender.close()
            raise
        self._constructing = False
        # TensorBoard charts of every push (SyncConfig.tb_dir; trainer rank 0 only): metrics/.
        self.metrics: SyncMetrics | None = SyncMetrics.for_rank(self.rank, self.config.tb_dir)

    def close(self) -> None:
        """Release the bridging group on every engine (they keep serving) and on the trainer."""
        for c in self.clients:
            try:
                c.shutdown()
            except EngineCallError:
                pass
        self.clients = []
        self.sender.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def lora_request(self):
        """The ``vllm.lora.request.LoRARequest`` of this trainer's adapter (a PEFT LoRA model pushed in adapter mode,
        SyncConfig.lora): pass it to ``llm.generate(..., lora_request=...)``. The same name and id every version;
        each push replaces the adapter in the engines' memory. For ``vllm serve`` requests, the model name is
        ``config.lora_name``."""
        from ..engines.vllm import compat

        return compat.lora_request(self.config.lora_name, self.config.lora_int_id)

    # --- training-loop integrations (trainer_sync/integrations/) ------------------------------------------------
    def attach(self, target, every: int = 1, *, on_error: str = "raise", start_step: int = 0, accelerator=None):
        """Push after every ``every``-th update of ``target``, on every trainer rank together; returns the hook.

        ``target``: a torch optimizer or Accelerate's wrapped one (its step post-hook), or a DeepSpeed engine (after
        ``engine.step()`` at accumulation boundaries). ``on_error``: "raise" (the push's error leaves ``step()``
        naming the engine and stage) or "warn" (warn and keep training). ``accelerator``: log the TensorBoard
        charts into its TensorBoard tracker when ``config.tb_dir`` is unset. See trainer_sync/integrations/.
        """
        from ..integrations import attach

        return attach(self, target, every, on_error=on_error, start_step=start_step, accelerator=accelerator)

    def callback(self, every: int = 1, *, on_error: str = "raise"):
        """A ``transformers.TrainerCallback`` pushing at every ``every``-th global step (HF Trainer, TRL trainers)."""
        from ..integrations.transformers import WeightSyncCallback

        return WeightSyncCallback(self, every, on_error=on_error)

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
