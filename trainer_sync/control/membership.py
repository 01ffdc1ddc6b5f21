"""Membership: which engines (and how many receiver ranks) form the bridging group of an epoch; engines joining by
catch-up (``add_engine``) and engines that left."""
from __future__ import annotations

import warnings

from ..errors import RendezvousRefused, SyncError
from ..engines.clients import EngineCallError, EngineClient, make_client, served_version
from ..protocol import wire
from ..protocol.messages import Keys, ServedVersion, UpdateSession, Verdict
from .engine_calls import Background, stage_of


class Membership:
    """WeightSync's membership (a mixin over WeightSync's state)."""

    # --- bridging group ---------------------------------------------------------------------------------------
    def _count_receivers(self) -> Verdict:
        """Rank 0: every engine's worker count and the first receiver rank of each engine.

        At construction an engine that does not answer is a configuration error: every such engine is named, with
        its error. Later, one that stopped or died leaves the membership (a warning) and the others carry on."""
        offsets, total, alive, gone = [], 0, [], []
        self.receiver_names, self.receiver_engines = [], []
        for c in self.clients:
            try:
                n = c.world_size()
            except EngineCallError as e:
                gone.append(e)  # str(e): "engine i (url): get_world_size failed: ..."
                if not self._constructing:
                    warnings.warn(f"trainer_sync: dropping {c.name} from the membership: {e.detail}")
                    self.served.pop(c.name, None)
                continue
            alive.append(c)
            offsets.append(total)
            total += n
            self.receiver_names += [f"{c.name} worker {w}" for w in range(n)]
            self.receiver_engines += [c.name] * n
        if gone and self._constructing:
            raise SyncError(f"trainer_sync: {len(gone)} of {len(self.clients)} engine(s) cannot be reached:\n  " +
                            "\n  ".join(str(e) for e in gone), "rendezvous", ", ".join(e.engine for e in gone),
                            members=[e.engine for e in gone])
        if not alive:
            raise SyncError("trainer_sync: no engine answers; every engine left the membership:\n  " +
                            "\n  ".join(str(e) for e in gone), "rendezvous", ", ".join(c.name for c in self.clients),
                            members=[c.name for c in self.clients])
        self.clients = alive
        return Verdict(data={"num_receivers": total, "offsets": offsets})

    def _engine_version(self) -> int:
        """Rank 0, once every engine joined: the highest integer version the engines serve (0 if none does).

        What an engine serves is its vLLM's weight version where the release keeps one, else what its workers
        announced when they joined (``Keys.served_version``; vLLM 0.26): engines/clients.py served_version. An announced
        version is also remembered as the one the engine serves (``weight_versions``, ``membership``)."""
        store = self.sender.bridge.store
        announced: dict[str, int] = {}
        for j, name in enumerate(self.receiver_engines):
            k = Keys.served_version(j)
            v = ServedVersion.from_json(store.get(k)).version if store.check([k]) else None
            if v is not None:  # the workers of one engine agree; the highest, should one have missed a push
                announced[name] = max(v, announced.get(name, v))
        best = 0
        for c in self.clients:
            if c.name in announced:
                self.served[c.name] = str(announced[c.name])
            try:
                v = served_version(c, announced.get(c.name))
                if v is not None:
                    best = max(best, int(v))
            except (EngineCallError, ValueError):  # not a counter (vLLM's default, a name): nothing to continue
                pass
        return best

    def _connect(self) -> None:
        """Form a new bridging group with every worker of every engine (all ranks; rank 0 calls the engines)."""
        plan = self._agree(self._count_receivers)
        self._raise(plan)
        n = plan.data["num_receivers"]
        calls: list[tuple[EngineClient, Background]] = []
        if self.rank == 0:
            # Join infos are made before connect() opens the new epoch they name.
            infos = [self.sender.join_info(off, n).to_dict() for off in plan.data["offsets"]]
            epoch = infos[0]["epoch"] if infos else self.sender.epoch + 1
            calls = [(c, Background(lambda c=c, i=i: c.init(i),
                                     on_error=lambda e, c=c, epoch=epoch: self.sender.abort_epoch(
                                         epoch, f"{c.name} did not join: {e}")))
                     for c, i in zip(self.clients, infos)]
        error: BaseException | None = None
        try:
            self.sender.connect(n)
        except Exception as e:  # noqa: BLE001 - reported together with the engines' side below
            error = e

        def joined() -> Verdict:
            problems = []
            for c, call in calls:
                if not call.wait(self.config.timeout_s + 30):
                    problems.append((c.name, f"{c.name}: init_weight_transfer_engine did not return"))
                elif call.error is not None:
                    problems.append((c.name, str(call.error)))
            if isinstance(error, RendezvousRefused):
                # The trainer knows who was refused (receiver ranks); say which engine that is, first.
                owners = list(dict.fromkeys(self.receiver_engines[j] for j in error.receivers
                                            if j < len(self.receiver_engines)))
                problems.insert(0, (", ".join(owners), f"trainer rank 0: {error} ({', '.join(owners)})"))
            elif error is not None and not problems:
                problems.append(("", f"trainer rank 0: {error}"))
            if problems:
                return Verdict("trainer_sync could not connect the engines:\n  " + "\n  ".join(p for _, p in problems),
                               "rendezvous", problems[0][0], members=[w for w, _ in problems if w])
            return Verdict(data={"engine_version": self._engine_version()})

        verdict = self._agree(joined)
        self._raise(verdict, error)
        if error is not None:  # this rank failed though rank 0 saw none: nothing consistent to go on
            raise error
        self.num_receivers = n
        self.engine_version = verdict.data["engine_version"]
        self.stale = False
        if self.rank == 0:
            self._close_abandoned_sessions()

    def _close_abandoned_sessions(self) -> None:
        """Rank 0, once every engine joined: end the vLLM update sessions that an earlier trainer left open when it
        died mid-update (each worker of the vLLM backend says so when it joins, ``Keys.open_session``).

        vLLM gives the backend no handle on its worker, and only the worker's own ``finish_weight_update`` closes
        its session, so the trainer calls it on the engine (the workers without an open session refuse, as
        ``_close_session`` expects). Receivers that write no such key (not the vLLM backend) have none."""
        store = self.sender.bridge.store
        said = [wire.read_if(store, Keys.open_session(j), UpdateSession, stage="rendezvous")
                for j in range(len(self.receiver_engines))]
        held = {self.receiver_engines[j] for j, s in enumerate(said) if s is not None and s.open}
        for c in self.clients:
            if c.name in held:
                self._close_session(c)

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
            raise SyncError(str(e), stage_of(e), c.name) from e
        with self._joined_lock:
            self._joined.append(c)
            self.served[c.name] = version
        return c.name

    def _admit_joined(self) -> Verdict:
        """Rank 0: engines that caught up enter the membership now (the group is rebuilt: a new epoch)."""
        with self._joined_lock:
            joined, self._joined = self._joined, []
        self.clients += joined
        return Verdict(changed=bool(joined))

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
