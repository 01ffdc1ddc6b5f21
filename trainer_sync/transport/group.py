"""Rendezvous and the bridging group between M trainer ranks and N receiver ranks.

Why our own groups: the trainer already has a default group (DDP/FSDP/ZeRO) and every vLLM worker has vLLM's own; a
weight sync must not touch either. So the trainer's rank 0 hosts a TCPStore, every member authenticates on it with
the shared token, and then one process group per trainer rank is built straight from the store (``src{r}``: trainer
rank r as group rank 0, receivers as 1..N). One group per sender lets all M trainer ranks broadcast their own
buckets at the same time instead of queueing on one root, and a trainer rank never receives bytes it does not need.

Security: the token never travels. Trainer rank 0 writes a fresh nonce per epoch; a peer answers with
HMAC(token, nonce | role | rank); rank 0 checks each answer and writes a verdict. The group keys live under a prefix
derived from the token and nonce, so a peer without the token cannot even find them, let alone join or inject.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from ..errors import Aborted, RendezvousRefused, SyncError



@dataclass(frozen=True)
class Member:
    role: str  # "trainer" | "receiver"
    rank: int

    def __str__(self) -> str:
        return f"trainer rank {self.rank}" if self.role == "trainer" else f"receiver {self.rank}"

    @property
    def key(self) -> str:
        return f"{self.role}{self.rank}"


def _mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def wait_keys(store: dist.Store, keys: list[str], timeout_s: float, abort_key: str | None = None,
              stage: str = "rendezvous", max_pause_s: float = 5e-3, error: type[SyncError] = Aborted
              ) -> list[str]:
    """Wait until every key exists; return the missing ones on timeout (empty list: all there).

    Without ``abort_key`` this is one blocking wait on the store server (no polling latency on the hot path). With
    it, it polls (backing off from 0.1 ms to ``max_pause_s``) so that it can stop early when another member gives up:
    then it raises ``error`` (``Aborted`` by default; the rendezvous raises a plain SyncError, as it always did) at
    ``stage`` with the reason written under ``abort_key``.
    """
    try:
        if abort_key is None:
            try:
                store.wait(keys, timedelta(seconds=timeout_s))
                return []
            except dist.DistStoreError:
                return [k for k in keys if not store.check([k])]
        start = time.monotonic()
        deadline, pause = start + timeout_s, 1e-4
        pending = list(keys)
        while True:
            pending = [k for k in pending if not store.check([k])]
            if not pending:
                return []
            if store.check([abort_key]):
                raise error(store.get(abort_key).decode(), stage=stage)
            if time.monotonic() >= deadline:
                return pending
            time.sleep(pause)
            # Tight while a reply is due soon; after a second (a receiver idle between pushes) at most 100 polls/s.
            pause = min(pause * 2, max_pause_s if time.monotonic() - start < 1.0 else max(max_pause_s, 0.01))
    except dist.DistError as e:
        raise SyncError(f"trainer_sync rendezvous store went away (trainer rank 0 stopped?): {e}",
                        stage="rendezvous", who="trainer rank 0") from e


def abort_reason(store: dist.Store, abort_key: str) -> str | None:
    """What a member wrote under ``abort_key`` (it gave up on the operation), or None. A store that went away is
    reported like ``wait_keys`` does: trainer rank 0, which hosts it, stopped."""
    try:
        return store.get(abort_key).decode() if store.check([abort_key]) else None
    except dist.DistError as e:
        raise SyncError(f"trainer_sync rendezvous store went away (trainer rank 0 stopped?): {e}",
                        stage="transfer", who="trainer rank 0") from e


class Rendezvous:
    """The TCPStore everyone meets on, plus token authentication. Lives as long as the sync (many epochs)."""

    # Set by the trainer while none of its engines holds a version it pushed whole since its last refused or failed
    # push: an engine it joined then lets another trainer take it (a notebook's second WeightSync while the first,
    # refused one is still referenced), instead of waiting for the first to close or die.
    RELEASED_KEY = "trainer_sync/released"

    def __init__(self, host: str, port: int, token: str, is_server: bool, timeout_s: float):
        if not token:
            raise ValueError("trainer_sync needs a non-empty token (SyncConfig.token or TRAINER_SYNC_TOKEN)")
        self.token = token
        self.timeout_s = timeout_s
        listen_fd = None
        try:
            if is_server:
                # Bind the listening socket ourselves: TCPStore alone listens on every interface, and an operator
                # who configured host=10.0.0.5 expects nothing reachable elsewhere. The store owns the fd after.
                listener = socket.create_server((host, port), backlog=1024)
                port = listener.getsockname()[1]
                listen_fd = listener.detach()
            self.store = dist.TCPStore(host, port, is_master=is_server, timeout=timedelta(seconds=timeout_s),
                                       wait_for_workers=False, use_libuv=True, master_listen_fd=listen_fd)
        except Exception as e:  # the store's own error does not say which address
            raise SyncError(f"cannot {'listen on' if is_server else 'reach'} the trainer_sync rendezvous at "
                            f"{host}:{port}: {e}", stage="rendezvous") from e
        self.host = host
        self.port = self.store.port

    def authenticate(self, me: Member, epoch: int, others: list[Member]) -> dist.Store:
        """Check tokens for one epoch; return the secured store namespace for that epoch.

        Trainer rank 0 is the judge (``others`` lists everyone it must admit); every other member proves it knows
        the token and waits for its verdict. Raises RendezvousRefused (wrong token) or SyncError (a peer never came).
        """
        base = f"ts/e{epoch}/"
        nonce_key, abort_key = base + "nonce", base + "abort"
        if me == Member("trainer", 0):
            nonce = secrets.token_hex(16)
            self.store.set(nonce_key, nonce)
            # With abort_key: an engine whose init failed is reported here at once (WeightSync writes it), not after
            # the timeout.
            missing = wait_keys(self.store, [base + "auth/" + m.key for m in others], self.timeout_s,
                                abort_key=abort_key, error=SyncError)
            if missing:
                names = ", ".join(str(m) for m in others if base + "auth/" + m.key in missing)
                msg = f"trainer_sync rendezvous (epoch {epoch}): {names} did not join within {self.timeout_s:g}s"
                self.store.set(abort_key, msg)
                raise SyncError(msg, stage="rendezvous", who=names)
            refused = [str(m) for m in others if not hmac.compare_digest(
                self.store.get(base + "auth/" + m.key).decode(), _mac(self.token, nonce, m.role, str(m.rank)))]
            # Verdicts only once everyone is checked: with one peer refused the group cannot form, so the honest
            # peers are told "aborted" at once instead of waiting out their timeout for a group that never comes.
            for m in others:
                self.store.set(base + "verdict/" + m.key, "refused" if str(m) in refused else
                               "aborted" if refused else "ok")
            if refused:
                # Let the refused peers read their verdict before this rank raises (and may close the store).
                wait_keys(self.store, [base + "seen/" + m.key for m in others if str(m) in refused],
                          min(5.0, self.timeout_s))
                msg = f"trainer_sync rendezvous (epoch {epoch}) refused {', '.join(refused)}: wrong token"
                self.store.set(abort_key, msg)
                refused_receivers = [m.rank for m in others if m.role == "receiver" and str(m) in refused]
                raise RendezvousRefused(msg, stage="rendezvous", who=", ".join(refused), receivers=refused_receivers)
        else:
            if wait_keys(self.store, [nonce_key], self.timeout_s):
                raise SyncError(f"{me}: trainer rank 0 opened no rendezvous epoch {epoch} within "
                                f"{self.timeout_s:g}s", stage="rendezvous", who="trainer rank 0")
            nonce = self.store.get(nonce_key).decode()
            self.store.set(base + "auth/" + me.key, _mac(self.token, nonce, me.role, str(me.rank)))
            verdict_key = base + "verdict/" + me.key
            if wait_keys(self.store, [verdict_key], self.timeout_s, abort_key=abort_key, error=SyncError):
                raise SyncError(f"{me}: no verdict from trainer rank 0 within {self.timeout_s:g}s",
                                stage="rendezvous", who="trainer rank 0")
            verdict = self.store.get(verdict_key).decode()
            self.store.set(base + "seen/" + me.key, "1")
            if verdict == "aborted":
                why = self.store.get(abort_key).decode() if self.store.check([abort_key]) else ""
                raise SyncError(f"{me}: the trainer_sync rendezvous of epoch {epoch} was aborted: another peer was "
                                f"refused ({why})",
                                stage="rendezvous", who="another peer")
            if verdict != "ok":
                raise RendezvousRefused(f"{me} was refused by the trainer_sync rendezvous: wrong token",
                                        stage="rendezvous", who=str(me))
        return self._namespace(base, nonce)

    def _namespace(self, base: str, nonce: str) -> dist.Store:
        return dist.PrefixStore(f"{base}{_mac(self.token, nonce, 'namespace')[:32]}/", self.store)

    def abort(self, epoch: int, reason: str) -> None:
        """Give up on forming epoch ``epoch`` (an engine's init failed): every member waiting in it raises now."""
        self.store.set(f"ts/e{epoch}/abort", reason)

    def namespace(self, epoch) -> dist.Store:
        """The secured namespace of an epoch that trainer rank 0 already opened, for a member that holds the token
        itself (another trainer rank joining a catch-up, say) and so needs no verdict."""
        base = f"ts/e{epoch}/"
        return self._namespace(base, self.store.get(base + "nonce").decode())

    def release(self) -> None:
        """Let the engines joined through this rendezvous go to another trainer (see RELEASED_KEY)."""
        self.store.set(self.RELEASED_KEY, "1")

    def hold(self) -> None:
        """Hold them again (a push of this trainer landed whole)."""
        self.store.delete_key(self.RELEASED_KEY)

    @classmethod
    def released(cls, store: dist.Store) -> bool:
        """Whether the trainer behind ``store`` (an engine's connection to it) released its engines."""
        return store.check([cls.RELEASED_KEY])

    def close(self) -> None:
        self.store = None  # dropping the last reference stops the server (and closes its socket) on rank 0


def local_address_towards(host: str) -> str:
    """The address of this machine's interface that routes to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def make_group(store: dist.Store, rank: int, size: int, backend: str, timeout_s: float, host: str | None = None):
    """One raw process group from a store, outside torch.distributed's global state.

    With ``host`` (the rendezvous address), gloo binds to the interface that reaches it rather than to whatever the
    machine's hostname resolves to, so data stays on the network the operator chose.
    """
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        if host is None:
            return dist.ProcessGroupGloo(store, rank, size, timeout)
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address_towards(host))]
        return dist.ProcessGroupGloo(store, rank, size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, opts)
    raise ValueError(f"unsupported trainer_sync backend {backend!r} (use gloo or nccl)")


class BridgeGroup:
    """The groups of one epoch: ``src{r}`` = trainer rank r (group rank 0) + the receivers it reaches over the wire
    (group ranks 1..). A trainer rank holds only its own group; a receiver holds one per trainer rank that reaches it.

    ``decide(store)``, called after authentication and before any group forms, returns the epoch's Layout
    (transport/layout.py): receivers on a trainer rank's own GPU are left out of its group (CUDA IPC carries that
    hop), and a trainer rank with no other receivers forms no group at all. Without it every receiver is in every
    group. ``close()`` shuts the groups down explicitly (a gloo group left to the garbage collector can abort the
    process at exit).
    """

    def __init__(self, rdzv: Rendezvous, me: Member, epoch: int, num_trainers: int, num_receivers: int,
                 backend: str, timeout_s: float, decide=None):
        if num_trainers < 1 or num_receivers < 1:
            raise ValueError(f"a bridging group needs >= 1 trainer and receiver rank, got {num_trainers}, "
                             f"{num_receivers}")
        self.me, self.epoch, self.backend = me, epoch, backend
        self.num_trainers, self.num_receivers = num_trainers, num_receivers
        others = [Member("trainer", r) for r in range(1, num_trainers)] + \
                 [Member("receiver", j) for j in range(num_receivers)]
        if me.role == "trainer" and me.rank >= num_trainers or me.role == "receiver" and me.rank >= num_receivers:
            raise ValueError(f"{me} is outside a group of {num_trainers} trainer ranks and {num_receivers} receivers")
        self.store = rdzv.authenticate(me, epoch, others)
        self.layout = decide(self.store) if decide is not None else None
        self.groups: dict[int, object] = {}
        try:
            for r in ([me.rank] if me.role == "trainer" else range(num_trainers)):
                wired = self.wired(r)
                if not wired or me.role == "receiver" and me.rank not in wired:
                    continue
                rank = 0 if me.role == "trainer" else 1 + wired.index(me.rank)
                self.groups[r] = make_group(dist.PrefixStore(f"src{r}/", self.store), rank, 1 + len(wired),
                                            backend, timeout_s, rdzv.host)
        except Exception as e:
            self.close()
            raise SyncError(f"{me}: could not form the bridging group of epoch {epoch}: {e}",
                            stage="rendezvous") from e

    def wired(self, r: int) -> tuple[int, ...]:
        """The receivers trainer rank r reaches through its group."""
        return self.layout.remote(r) if self.layout is not None else tuple(range(self.num_receivers))

    def close(self, in_background: bool = False) -> None:
        """Shut the groups down. ``in_background`` after a failed transfer only (see below); a normal close is
        synchronous, so nothing of the groups outlives it (a thread still tearing a group down at interpreter exit
        aborts the process)."""
        groups = list(self.groups.values())
        self.groups.clear()
        for pg in groups:
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - best effort; nothing else can be done at close
                pass
        pg = None  # drop this frame's reference too
        if not in_background:
            groups.clear()
            return
        # After a failed push the last reference goes in a thread of its own: destroying a gloo group waits for its
        # pending work, and that can be a receive from a stalled peer, which would hold the caller until the peer's
        # timeout. Once destroyed, its connections close and live peers fail at once.
        threading.Thread(target=groups.clear, name="trainer_sync-close-group", daemon=True).start()
