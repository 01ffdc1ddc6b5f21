"""One push across the engines, as trainer rank 0 drives it: pause and start every engine, update each from a
thread while every trainer rank sends, then finish, reset and resume (or leave paused) each; engines that died
leave and the version goes again to the others."""
from __future__ import annotations

import dataclasses
import time
import warnings

from ..errors import HandshakeMismatch, SyncError
from ..protocol.report import SyncReport
from ..engines.clients import EngineCallError, EngineClient
from ..protocol.messages import ErrorKind, Verdict
from .engine_calls import Background, stage_of


class PushMachine:
    """WeightSync's push state machine (a mixin over WeightSync's state)."""

    # --- one push ---------------------------------------------------------------------------------------------
    def _begin(self) -> Verdict:
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
            return Verdict(str(e), stage_of(e), e.engine, members=[e.engine], dead=dead)
        return Verdict()

    def _end(self, version: int, updates: list[tuple[EngineClient, Background]], error: BaseException | None
             ) -> Verdict:
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
                    info = getattr(call.error, "info", None)  # the engine's ErrorInfo (engines/clients.py)
                    if info is not None and info.kind == ErrorKind.UNTOUCHED:  # no weight applied: old ones, whole
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
                problems.append((stage_of(e), c.name, f"{e}; the engine stays paused"))
        if error is not None and not refused:
            problems.append((failed_stage, getattr(error, "who", "") or "trainer rank 0", f"trainer rank 0: {error}"))
        if problems:
            dead = [c.name for c in self.clients if c.name in {w for _, w, _ in problems} and not self._alive(c)]
            return Verdict("trainer_sync push failed:\n  " + "\n  ".join(m for _, _, m in problems), problems[0][0],
                           problems[0][1], members=list(dict.fromkeys(w for _, w, _ in problems)), dead=dead)
        return Verdict(refused=list(error.mismatches), receivers=list(error.receivers)) if refused else Verdict()

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

        The backend raises a failure from one worker only (see engines/vllm/ ``_report``), so the other workers
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
            dead = e.dead
            if not dead:
                raise
            first = e
        if not self._agree(lambda: Verdict(data={"left": len(self.clients)})).data["left"]:
            raise SyncError(f"trainer_sync: {', '.join(dead)} died during the transfer of version {version}; no "
                            f"engine is left in the membership:\n  {first}", "transfer", ", ".join(dead),
                            members=list(dead)) from None
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
        if changed.changed:
            self.stale = True
        if self.stale:
            self._connect()
        begun = self._agree(self._begin)
        while begun.failed and begun.dead:  # engines gone since the last push: a new epoch without them
            self._connect()
            begun = self._agree(self._begin)
        if begun.failed:
            self.stale = True
            self._raise(begun)
        seq = self.sender.seq  # the number of the push below: an engine whose update call fails aborts it
        updates = [(c, Background(c.update, on_error=lambda e: self.sender.abort_push(seq, str(e))))
                   for c in self.clients]
        report, error = None, None
        try:
            report = self.sender.push(version)
        except Exception as e:  # noqa: BLE001 - rank 0's verdict below decides what every rank raises
            error = e
        verdict = self._agree(lambda: self._end(version, updates, error))
        if verdict.failed or verdict.refused is not None:
            self._release()
        if verdict.failed:
            self.stale = True
            dead = verdict.dead
            if self.rank == 0 and dead:
                self.clients = [c for c in self.clients if c.name not in dead]
                for name in dead:
                    self.served.pop(name, None)
            self._raise(verdict, error)  # SyncError.dead: the engines that left
        if verdict.refused is not None:
            refused = error if isinstance(error, HandshakeMismatch) else \
                HandshakeMismatch(verdict.refused, verdict.receivers)
            raise self._name_engines(refused)
        if error is not None:
            self.stale = True
            raise error
        report = dataclasses.replace(report, total_s=time.perf_counter() - t0)
        self.engine_version = version  # every engine serves it now
        if self.released and self.rank == 0:
            self.sender.rdzv.hold()
        self.released = False
        if self.metrics is not None:
            self.metrics.log(report)
        return report

    def _release(self) -> None:
        """After a refused or failed push: the engines are free for another trainer (a new WeightSync in the same
        notebook, while this one is still referenced) until a push of this one lands again. The next push of this
        one forms a new group, so that an engine another trainer took meanwhile is named, not waited for."""
        if self.rank == 0 and not self.released:
            self.sender.rdzv.release()
        self.released, self.stale = True, True

    def _name_engines(self, err: HandshakeMismatch) -> HandshakeMismatch:
        """Say which engines refused: the mismatch lines name receiver ranks, and rank 0 knows whose they are."""
        ranks = sorted(j for j in set(err.receivers) if j < len(self.receiver_names))
        owners = [f"receiver {j} = {self.receiver_names[j]}" for j in ranks]
        if owners:
            err.who = ", ".join(dict.fromkeys(self.receiver_engines[j] for j in ranks))
            err.args = (f"{err.args[0]}\n  (refused by {'; '.join(owners)})",)
        return err
