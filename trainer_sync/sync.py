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
engine. An engine that says its update failed before any weight was applied (errors.UNTOUCHED) is resumed at once.

Ownership and versions: an engine has one owner (engines/vllm.py refuses another trainer's join while the owner is
alive). The weight version an engine reports never goes backwards by default: ``push()`` without a version continues
from the highest version any engine reports (a trainer taking over an engine that served version 3 pushes 4). Only
an explicit ``push(version=v)`` (the training-loop hooks pass the global step) may set a lower one, with a warning.
"""
from __future__ import annotations

import dataclasses
import threading
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist

from .config import SyncConfig
from .errors import UNTOUCHED, HandshakeMismatch, RendezvousRefused, SyncError
from .report import SyncReport
from .sender import Sender
from .engines.clients import EngineCallError, EngineClient, make_client
from .metrics import SyncMetrics

# vLLM call -> the stage a failure of it is reported under.
_STAGE = {"get_world_size": "rendezvous", "init_weight_transfer_engine": "rendezvous", "pause": "pause",
          "start_weight_update": "start", "update_weights": "transfer", "finish_weight_update": "finish",
          "reset_prefix_cache": "finish", "resume": "resume"}


def _stage(e: EngineCallError) -> str:
    return _STAGE.get(e.call, e.call)


class _Background:
    """Run one engine call in a daemon thread (a thread stuck in a dead engine must not block interpreter exit).

    ``on_error(e)`` runs in that thread as soon as the call fails: it aborts the rendezvous or push the call belongs
    to, so that no trainer rank waits out its timeout for an engine that already gave up."""

    def __init__(self, fn: Callable[[], None], on_error: Callable[[BaseException], None] | None = None):
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, on_error), daemon=True)
        self._thread.start()

    def _run(self, fn, on_error) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self.error = e
            if on_error is not None:
                on_error(e)

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


class WeightSync:
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
        self.stale = True  # the bridging group must be (re)built before the next push; same value on every rank
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
        # TensorBoard charts of every push (SyncConfig.tb_dir; trainer rank 0 only): trainer_sync/metrics.py.
        self.metrics: SyncMetrics | None = SyncMetrics.for_rank(self.rank, self.config.tb_dir)

    # --- agreement between trainer ranks ------------------------------------------------------------------------
    def _agree(self, fn: Callable[[], dict | None]) -> dict:
        """Run ``fn`` on rank 0 and give its verdict (a small dict) to every rank.

        Any exception in ``fn`` becomes an error verdict, so rank 0 always reaches the broadcast.
        """
        out: dict | None = None
        if self.rank == 0:
            try:
                out = fn() or {}
            except SyncError as e:
                out = {"error": str(e), "stage": e.stage, "who": e.who}
            except Exception as e:  # noqa: BLE001 - becomes the error every rank raises
                out = {"error": f"{type(e).__name__}: {e}", "stage": "", "who": ""}
        if self.world > 1:
            box = [out]
            dist.broadcast_object_list(box, src=0)
            out = box[0]
        return out

    @staticmethod
    def _raise(verdict: dict, cause: BaseException | None = None) -> None:
        if "error" in verdict:
            raise SyncError(verdict["error"], verdict.get("stage", ""), verdict.get("who", "")) from cause

    # --- bridging group ---------------------------------------------------------------------------------------
    def _count_receivers(self) -> dict:
        """Rank 0: every engine's worker count, the first receiver rank of each engine, and the highest weight
        version they report.

        At construction an engine that does not answer is a configuration error: every such engine is named, with
        its error. Later, one that stopped or died leaves the membership (a warning) and the others carry on."""
        offsets, total, alive, gone = [], 0, [], []
        self.receiver_names = []
        for c in self.clients:
            try:
                n = c.world_size()
            except EngineCallError as e:
                gone.append(str(e))  # "engine i (url): get_world_size failed: ..."
                if not self._constructing:
                    warnings.warn(f"trainer_sync: dropping {c.name} from the membership: {e.detail}")
                    self.served.pop(c.name, None)
                continue
            alive.append(c)
            offsets.append(total)
            total += n
            self.receiver_names += [f"{c.name} worker {w}" for w in range(n)]
        if gone and self._constructing:
            raise SyncError(f"trainer_sync: {len(gone)} of {len(self.clients)} engine(s) cannot be reached:\n  " +
                            "\n  ".join(gone), "rendezvous", ", ".join(g.split(": ", 1)[0] for g in gone))
        if not alive:
            raise SyncError("trainer_sync: no engine answers; every engine left the membership:\n  " +
                            "\n  ".join(gone), "rendezvous", ", ".join(c.name for c in self.clients))
        self.clients = alive
        return {"num_receivers": total, "offsets": offsets, "engine_version": self._engine_version()}

    def _engine_version(self) -> int:
        """Rank 0: the highest integer weight version the engines report (0 if none does)."""
        best = 0
        for c in self.clients:
            try:
                v = c.weight_version()
                if v is not None:  # None: a vLLM without weight versions (0.26)
                    best = max(best, int(v))
            except (EngineCallError, ValueError):  # not a counter (vLLM's default, a name): nothing to continue
                pass
        return best

    def _connect(self) -> None:
        """Form a new bridging group with every worker of every engine (all ranks; rank 0 calls the engines)."""
        plan = self._agree(self._count_receivers)
        self._raise(plan)
        n = plan["num_receivers"]
        self.engine_version = plan["engine_version"]
        calls: list[tuple[EngineClient, _Background]] = []
        if self.rank == 0:
            # Join infos are made before connect() opens the new epoch they name.
            infos = [self.sender.join_info(off, n).to_dict() for off in plan["offsets"]]
            epoch = infos[0]["epoch"] if infos else self.sender.epoch + 1
            calls = [(c, _Background(lambda c=c, i=i: c.init(i),
                                     on_error=lambda e, c=c, epoch=epoch: self.sender.abort_epoch(
                                         epoch, f"{c.name} did not join: {e}")))
                     for c, i in zip(self.clients, infos)]
        error: BaseException | None = None
        try:
            self.sender.connect(n)
        except Exception as e:  # noqa: BLE001 - reported together with the engines' side below
            error = e

        def joined() -> dict:
            problems = []
            for c, call in calls:
                if not call.wait(self.config.timeout_s + 30):
                    problems.append((c.name, f"{c.name}: init_weight_transfer_engine did not return"))
                elif call.error is not None:
                    problems.append((c.name, str(call.error)))
            if isinstance(error, RendezvousRefused):
                # The trainer knows who was refused (receiver ranks); say which engine that is, first.
                ranks = [int(w.split()[1]) for w in error.who.split(", ") if w.split()[1:2] and w.split()[1].isdigit()]
                owners = list(dict.fromkeys(self.receiver_names[j].rsplit(" worker ", 1)[0] for j in ranks
                                            if j < len(self.receiver_names)))
                problems.insert(0, (", ".join(owners), f"trainer rank 0: {error} ({', '.join(owners)})"))
            elif error is not None and not problems:
                problems.append(("", f"trainer rank 0: {error}"))
            if problems:
                return {"error": "trainer_sync could not connect the engines:\n  " +
                        "\n  ".join(p for _, p in problems), "stage": "rendezvous", "who": problems[0][0]}
            return {}

        verdict = self._agree(joined)
        self._raise(verdict, error)
        if error is not None:  # this rank failed though rank 0 saw none: nothing consistent to go on
            raise error
        self.num_receivers = n
        self.stale = False

    # --- one push ---------------------------------------------------------------------------------------------
    def _begin(self) -> dict:
        """Rank 0: pause and start every engine; on any failure undo what was done and report it."""
        paused: list[EngineClient] = []
        started: list[EngineClient] = []
        try:
            for c in self.clients:
                c.pause(self.config.pause_mode)
                paused.append(c)
            for c in self.clients:
                c.start()
                started.append(c)
        except EngineCallError as e:
            # start_weight_update does not touch the model (the backend begins its reload only once the plan is
            # accepted), so finishing with no version and resuming restores exactly the state before.
            for c in started:
                try:
                    c.finish(None)
                except EngineCallError:
                    pass
            for c in paused:
                try:
                    c.resume()
                except EngineCallError:
                    pass
            dead = [c.name for c in self.clients if c.name == e.engine and not self._alive(c)]
            if dead:  # it stopped or died since the last push: it leaves, the push goes on without it
                warnings.warn(f"trainer_sync: dropping {e.engine} from the membership: {e.detail}")
                self.clients = [c for c in self.clients if c.name not in dead]
                self.served.pop(e.engine, None)
            return {"error": str(e), "stage": _stage(e), "who": e.engine, "stale": True, "dead": dead}
        return {}

    def _end(self, version: int, updates: list[tuple[EngineClient, _Background]], error: BaseException | None
             ) -> dict:
        """Rank 0: finish, reset and resume every engine that received the whole push; leave the others paused."""
        refused = isinstance(error, HandshakeMismatch)
        failed_stage = getattr(error, "stage", "") or "transfer"
        problems: list[tuple[str, str, str]] = []  # (stage, who, message); engines first: they say who failed
        for c, call in updates:
            if not call.wait(self.config.timeout_s + 30):
                problems.append(("transfer", c.name, f"{c.name}: update_weights did not return within "
                                 f"{self.config.timeout_s + 30:g}s; the engine stays paused"))
                continue
            try:
                if call.error is not None:
                    self._close_session(c)
                    if refused:  # expected: the engine refused the plan before touching its model
                        c.resume()
                        continue
                    if UNTOUCHED in str(call.error):  # failed before any weight was applied: old weights, whole
                        c.resume()
                        problems.append((failed_stage, c.name, f"{call.error}; the engine was resumed"))
                        continue
                    problems.append((failed_stage, c.name, f"{call.error}; the engine stays paused (its model may "
                                     "be half updated) until a push succeeds"))
                    continue
                c.finish(None if refused else str(version))
                if not refused:
                    c.reset_prefix_cache()
                    self.served[c.name] = str(version)
                c.resume()
            except EngineCallError as e:
                problems.append((_stage(e), c.name, f"{e}; the engine stays paused"))
        if error is not None and not refused:
            problems.append((failed_stage, getattr(error, "who", "") or "trainer rank 0", f"trainer rank 0: {error}"))
        if problems:
            dead = [c.name for c in self.clients if c.name in {w for _, w, _ in problems} and not self._alive(c)]
            return {"error": "trainer_sync push failed:\n  " + "\n  ".join(m for _, _, m in problems),
                    "stage": problems[0][0], "who": problems[0][1], "stale": True, "dead": dead}
        return {"refused": list(error.mismatches)} if refused else {}

    @staticmethod
    def _alive(c: EngineClient) -> bool:
        try:
            c.world_size()
            return True
        except EngineCallError:
            return False

    @staticmethod
    def _close_session(c: EngineClient) -> None:
        """End the update session on every worker of an engine whose update failed.

        The backend raises a failure from one worker only (see engines/vllm.py ``_report``), so the other workers
        of a TP/PP engine still hold an open session, which would refuse the next start. finish() closes theirs;
        the worker that raised has none left and refuses, which is expected.
        """
        try:
            c.finish(None)
        except EngineCallError:
            pass

    def push(self, version: int | None = None) -> SyncReport:
        """Put the current weights into every engine as ``version`` (default: the last version + 1).

        Call on every trainer rank together. Returns the report (``total_s`` covers the whole push, engine calls
        included) once every engine serves the new weights; raises HandshakeMismatch (nothing sent, engines still
        serving their old weights) or SyncError (naming the engine and the stage).

        Versions never go backwards unless asked: without ``version`` the push is numbered after both this trainer's
        last push and the highest version an engine reported when the group formed (an engine taken over from an
        earlier trainer continues its count). An explicit ``version`` must be newer than this trainer's last push;
        below what an engine serves it is applied as asked (a new job restarting its step count), with a warning.
        """
        t0 = time.perf_counter()
        if version is None:
            version = max(self.sender.version, self.engine_version) + 1
        version = int(version)
        if version <= self.sender.version:
            raise ValueError(f"trainer_sync: version {version} is not newer than the last pushed "
                             f"({self.sender.version})")
        if version <= self.engine_version and self.rank == 0:
            warnings.warn(f"trainer_sync: pushing version {version} as asked, though an engine served version "
                          f"{self.engine_version} before this trainer: its reported version goes back (push() "
                          f"without a version would continue from {self.engine_version + 1})")
        try:
            return self._push(version, t0)
        except SyncError as e:
            dead = getattr(e, "dead", [])
            if not dead:
                raise
            first = e
        if not self._agree(lambda: {"left": len(self.clients)})["left"]:
            raise SyncError(f"trainer_sync: {', '.join(dead)} died during the transfer of version {version}; no "
                            f"engine is left in the membership:\n  {first}", "transfer", ", ".join(dead)) from None
        # Engines died during the transfer. They are out of the membership; the engines that are left did not get
        # this version whole, so it goes again to them alone on a new group, and then the failure is reported.
        warnings.warn(f"trainer_sync: {', '.join(dead)} died during the push of version {version}; pushing it again "
                      f"to the remaining engine(s)")
        self._push(version, t0)
        raise SyncError(f"trainer_sync: {', '.join(dead)} died during the transfer of version {version}; dropped "
                        f"from the membership, the push completed on the remaining engines", "transfer",
                        ", ".join(dead))

    def _push(self, version: int, t0: float) -> SyncReport:
        changed = self._agree(self._admit_joined)
        if changed.get("changed"):
            self.stale = True
        if self.stale:
            self._connect()
        begun = self._agree(self._begin)
        while "error" in begun and begun.get("dead"):  # engines gone since the last push: a new epoch without them
            self._connect()
            begun = self._agree(self._begin)
        if "error" in begun:
            self.stale = True
            self._raise(begun)
        seq = self.sender.seq  # the number of the push below: an engine whose update call fails aborts it
        updates = [(c, _Background(c.update, on_error=lambda e: self.sender.abort_push(seq, str(e))))
                   for c in self.clients]
        report, error = None, None
        try:
            report = self.sender.push(version)
        except Exception as e:  # noqa: BLE001 - rank 0's verdict below decides what every rank raises
            error = e
        verdict = self._agree(lambda: self._end(version, updates, error))
        if "error" in verdict:
            self.stale = True
            dead = verdict.get("dead") or []
            if self.rank == 0 and dead:
                self.clients = [c for c in self.clients if c.name not in dead]
                for name in dead:
                    self.served.pop(name, None)
            try:
                self._raise(verdict, error)
            except SyncError as e:
                e.dead = dead
                raise
        if "refused" in verdict:
            refused = error if isinstance(error, HandshakeMismatch) else HandshakeMismatch(verdict["refused"])
            raise self._name_engines(refused)
        if error is not None:
            self.stale = True
            raise error
        report = dataclasses.replace(report, total_s=time.perf_counter() - t0)
        self.engine_version = version  # every engine serves it now
        if self.metrics is not None:
            self.metrics.log(report)
        return report

    def _name_engines(self, err: HandshakeMismatch) -> HandshakeMismatch:
        """Say which engines refused: the mismatch lines name receiver ranks, and rank 0 knows whose they are."""
        ranks = sorted({int(head.split()[1]) for head in (m.split(":", 1)[0] for m in err.mismatches)
                        if head.startswith("receiver ") and head.split()[1].isdigit()})
        owners = [f"receiver {j} = {self.receiver_names[j]}" for j in ranks if j < len(self.receiver_names)]
        if owners:
            err.who = ", ".join(dict.fromkeys(o.split(" = ", 1)[1].rsplit(" worker ", 1)[0] for o in owners))
            err.args = (f"{err.args[0]}\n  (refused by {'; '.join(owners)})",)
        return err

    # --- dynamic membership ------------------------------------------------------------------------------------
    def add_engine(self, engine) -> str:
        """Rank 0: bring a newly started engine to the latest complete version, point to point, while training goes
        on; it joins the broadcast membership at the next push (a new epoch). Returns its name.

        Needs ``SyncConfig(keep_latest=True)``: every trainer rank keeps its share of the last push in host memory
        and serves it from a thread, so neither the training loop nor the GPUs take part. Safe to call from another
        thread than the training loop.
        """
        if self.rank != 0:
            raise RuntimeError("trainer_sync: add_engine is called on trainer rank 0 only")
        if not self.config.keep_latest:
            raise ValueError("trainer_sync: add_engine needs SyncConfig(keep_latest=True) (joiners pull the kept "
                             "latest version)")
        c = make_client(engine, len(self.clients) + len(self._joined), self.config.timeout_s)
        where = {"host": self.sender.rdzv.host, "port": self.sender.rdzv.port, "token": self.sender.rdzv.token,
                 "num_trainers": self.world, "timeout_s": self.config.timeout_s}
        try:
            c.pause(self.config.pause_mode)  # a new engine serves nothing until it holds the trainer's weights
            c.start()
            before = self.sender.snapshot.version
            try:
                c.update({"catchup": where})
            except EngineCallError:
                self._close_session(c)
                raise
            # The version pulled is the one kept before and after the pull (a push landing in between leaves it
            # unknown here; the next push, which includes the engine, sets it anyway).
            version = str(before) if before is not None and self.sender.snapshot.version == before else None
            c.finish(version)
            c.reset_prefix_cache()
            c.resume()
        except EngineCallError as e:
            raise SyncError(str(e), _stage(e), c.name) from e
        with self._joined_lock:
            self._joined.append(c)
            self.served[c.name] = version
        return c.name

    def _admit_joined(self) -> dict:
        """Rank 0: engines that caught up enter the membership now (the group is rebuilt: a new epoch)."""
        with self._joined_lock:
            joined, self._joined = self._joined, []
        self.clients += joined
        return {"changed": bool(joined)}

    def membership(self) -> dict:
        """Rank 0: the epoch of the bridging group and, per engine, the version it serves."""
        with self._joined_lock:
            pending = [c.name for c in self._joined]
        return {"epoch": self.sender.epoch,
                "engines": {c.name: self.served.get(c.name) for c in self.clients},
                "joining": {name: self.served.get(name) for name in pending}}

    def weight_versions(self) -> dict[str, str | None]:
        """Rank 0: the weight version each engine reports (for checks and logs). An engine whose vLLM keeps no
        weight version (0.26) is given the version its receivers last acknowledged applying."""
        out = {}
        for c in self.clients:
            v = c.weight_version()
            out[c.name] = v if v is not None else self.served.get(c.name)
        return out

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

    # --- training-loop integrations (trainer_sync/integrations/) ------------------------------------------------
    def attach(self, target, every: int = 1, *, on_error: str = "raise", start_step: int = 0, accelerator=None):
        """Push after every ``every``-th update of ``target``, on every trainer rank together; returns the hook.

        ``target``: a torch optimizer or Accelerate's wrapped one (its step post-hook), or a DeepSpeed engine (after
        ``engine.step()`` at accumulation boundaries). ``on_error``: "raise" (the push's error leaves ``step()``
        naming the engine and stage) or "warn" (warn and keep training). ``accelerator``: log the TensorBoard
        charts into its TensorBoard tracker when ``config.tb_dir`` is unset. See trainer_sync/integrations/.
        """
        from .integrations import attach

        return attach(self, target, every, on_error=on_error, start_step=start_step, accelerator=accelerator)

    def callback(self, every: int = 1, *, on_error: str = "raise"):
        """A ``transformers.TrainerCallback`` pushing at every ``every``-th global step (HF Trainer, TRL trainers)."""
        from .integrations.transformers import WeightSyncCallback

        return WeightSyncCallback(self, every, on_error=on_error)

    def __enter__(self) -> "WeightSync":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
