"""How the trainer drives one vLLM engine: the same nine calls for an in-process ``vllm.LLM`` and a ``vllm serve``.

WeightSync only ever talks to an ``EngineClient``; each kind of engine gets a small adapter:
  * ``LlmClient``: an in-process ``vllm.LLM`` (colocated, or the trainer's own process in tests and recipes);
  * ``HttpClient``: the base URL of ``vllm serve ... --weight-transfer-config '{"backend": "trainer_sync"}'``
    started with ``VLLM_SERVER_DEV_MODE=1`` (which mounts the weight-transfer, pause and cache routes).
Each call raises ``EngineCallError`` naming the engine and the call, so that a failed push says which engine failed
at which stage. Tensors never travel through these calls (bytes go over the bridging group), only small JSON.
"""
from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod

from ..protocol.error_frame import unframe
from ..protocol.messages import ErrorInfo
from ..protocol.wire import ProtocolError


class EngineCallError(RuntimeError):
    """One control call to one engine failed. ``info``: the engine's typed ErrorInfo when trainer_sync's backend
    raised it (taken out of the text vLLM passed on, error_frame.py), its ``engine`` set to this engine; None for a
    failure of vLLM or of the connection. ``detail`` is the text without the frame, cut to ``limit`` characters."""

    def __init__(self, engine: str, call: str, detail: str, limit: int | None = None):
        try:
            detail, info = unframe(detail)
        except ProtocolError as e:
            info, detail = None, f"{detail} ({e})"
        detail = detail if limit is None else detail[:limit]
        super().__init__(f"{engine}: {call} failed: {detail}")
        self.engine, self.call, self.detail = engine, call, detail
        self.info: ErrorInfo | None = None if info is None else dataclasses.replace(info, engine=engine)


class EngineClient(ABC):
    """The control plane of one engine. ``name`` appears in every error."""

    name: str

    @abstractmethod
    def world_size(self) -> int:
        """Worker ranks of this engine (TP x PP x DP): each one joins the bridging group as a receiver."""

    @abstractmethod
    def init(self, join_info: dict) -> None:
        """Join the bridging group (blocks until the trainer's connect() admits every receiver)."""

    @abstractmethod
    def pause(self, mode: str) -> None:
        """Stop scheduling: ``keep`` freezes requests in place, ``wait`` drains them, ``abort`` drops them."""

    @abstractmethod
    def resume(self) -> None: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def update(self, info: dict | None = None) -> None:
        """Receive one push; blocks until the engine's receivers applied it (or failed). ``info``: the backend's
        update info (``{"catchup": {...}}`` makes a joining engine pull the latest version point to point)."""

    @abstractmethod
    def finish(self, version: str | None) -> None:
        """Finalize the update; set the weight version the engine reports (None: leave it)."""

    @abstractmethod
    def reset_prefix_cache(self) -> None:
        """Drop KV blocks cached under the old weights (finish does not)."""

    @abstractmethod
    def weight_version(self) -> str | None:
        """The weight version the engine reports; None where its vLLM keeps none (0.26)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Leave the bridging group; the engine keeps serving."""

    def __repr__(self) -> str:
        return self.name


class LlmClient(EngineClient):
    """An in-process ``vllm.LLM``. Pause/resume map to ``sleep(level=0)`` / ``wake_up(["scheduling"])``, which only
    stop and restart the scheduler (weights and KV cache stay put).

    Requests kept by pause mode "keep" do not keep their KV cache across the update: resetting the prefix cache
    preempts them, and vLLM recomputes them under the new weights when generation resumes (``vllm serve``'s /pause
    already does the same)."""

    def __init__(self, llm, index: int = 0):
        from .vllm import compat  # imports vllm: only for in-process engines

        if compat.API is None:
            raise TypeError(f"trainer_sync: engine {index} looks like a vllm.LLM but vllm does not import here")
        self.api = compat.API
        self.llm = llm
        self.name = f"engine {index} (in-process LLM)"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # re-raised with the engine's name; the original is chained
            raise EngineCallError(self.name, what, f"{type(e).__name__}: {e}") from e

    def world_size(self) -> int:
        return int(self._call("get_world_size", self.llm.get_world_size, include_dp=True))

    def init(self, join_info: dict) -> None:
        self._call("init_weight_transfer_engine", self.llm.init_weight_transfer_engine, {"init_info": join_info})

    def pause(self, mode: str) -> None:
        try:
            self.llm.sleep(level=0, mode=mode)
        except ValueError as e:
            # An engine core inside this process refuses "wait" (it cannot step while we block). Nothing is in
            # flight there between generate() calls anyway, so freezing ("keep") is the same thing.
            if mode != "wait":
                raise EngineCallError(self.name, "pause", f"{type(e).__name__}: {e}") from e
            self._call("pause", self.llm.sleep, level=0, mode="keep")
        except Exception as e:  # see _call
            raise EngineCallError(self.name, "pause", f"{type(e).__name__}: {e}") from e

    def resume(self) -> None:
        self._call("resume", self.llm.wake_up, tags=["scheduling"])

    def start(self) -> None:
        self._call("start_weight_update", self.llm.start_weight_update)

    def update(self, info: dict | None = None) -> None:
        self._call("update_weights", self.llm.update_weights, {"update_info": info or {}})

    def finish(self, version: str | None) -> None:
        self._call("finish_weight_update", self.api.finish, self.llm, version)

    def reset_prefix_cache(self) -> None:
        # Preempting running (kept) requests is what makes the reset succeed under pause mode "keep"; they are
        # recomputed with the new weights when generation resumes.
        if not self._call("reset_prefix_cache", self.llm.reset_prefix_cache, reset_running_requests=True):
            raise EngineCallError(self.name, "reset_prefix_cache", "the engine reported failure")

    def weight_version(self) -> str | None:
        return self._call("get_weight_version", self.api.weight_version, self.llm)

    def shutdown(self) -> None:
        self._call("shutdown_weight_transfer_engine", self.api.shutdown, self.llm)


class HttpClient(EngineClient):
    """A ``vllm serve`` process reached over HTTP (stdlib urllib: no extra dependency on the trainer)."""

    def __init__(self, base_url: str, timeout_s: float = 120.0, index: int = 0):
        from .vllm.compat import HttpRoutes  # no vllm import: the trainer may not have vllm at all

        self.url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.name = f"engine {index} ({self.url})"
        self.routes = HttpRoutes()

    def _request(self, method: str, route: str, body: dict | None = None, query: dict | None = None,
                 timeout_s: float | None = None):
        url = self.url + route + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            err = EngineCallError(self.name, route.lstrip("/"), f"HTTP {e.code}: {e.read().decode()}", limit=2000)
            err.status = e.code
            raise err from e
        except (urllib.error.URLError, OSError) as e:
            raise EngineCallError(self.name, route.lstrip("/"), f"{type(e).__name__}: {e}") from e
        return json.loads(text) if text else {}

    def world_size(self) -> int:
        return int(self._request("GET", "/get_world_size", query={"include_dp": "true"})["world_size"])

    def init(self, join_info: dict) -> None:
        # Blocks until the whole group formed: allow the rendezvous timeout plus slack.
        self._request("POST", "/init_weight_transfer_engine", {"init_info": join_info},
                      timeout_s=join_info.get("timeout_s", self.timeout_s) + 30)

    def pause(self, mode: str) -> None:
        self._request("POST", "/pause", query={"mode": mode})

    def resume(self) -> None:
        self._request("POST", "/resume")

    def start(self) -> None:
        self._request("POST", "/start_weight_update")

    def update(self, info: dict | None = None) -> None:
        # The receiver bounds each of its waits by timeout_s, but a push of many buckets takes several of them;
        # this is only a backstop against a server that stopped answering.
        self._request("POST", "/update_weights", {"update_info": info or {}}, timeout_s=10 * self.timeout_s)

    def finish(self, version: str | None) -> None:
        self._request("POST", "/finish_weight_update", self.routes.finish_body(version))

    def reset_prefix_cache(self) -> None:
        # See LlmClient.reset_prefix_cache for why running requests are preempted.
        if not self._request("POST", "/reset_prefix_cache", query={"reset_running_requests": "true"}).get("success"):
            raise EngineCallError(self.name, "reset_prefix_cache", "the engine reported failure")

    def _optional(self, method: str, route: str, body: dict | None = None):
        """A route some releases lack (compat.HttpRoutes): None, remembered, when this server has no such route."""
        if route in self.routes.missing:
            return None
        try:
            return self._request(method, route, body)
        except EngineCallError as e:
            if not self.routes.absent(getattr(e, "status", 0)):
                raise
            self.routes.missing.add(route)
            return None

    def weight_version(self) -> str | None:
        info = self._optional("GET", "/weight_info")
        return None if info is None else str(info["weight_version"])

    def shutdown(self) -> None:
        if self._optional("POST", "/shutdown_weight_transfer_engine") is None:
            self._request("POST", "/init_weight_transfer_engine", self.routes.leave_body())


def served_version(client: EngineClient, announced: int | None) -> str | None:
    """The version an engine serves: its vLLM's weight version where the release keeps one, else ``announced`` (what
    the trainer_sync backend's workers said they last applied when they joined): compat.served_version. A function,
    not a method, so that clients registered with ``EngineClient.register`` get it too."""
    from .vllm.compat import served_version as believed

    return believed(client.weight_version(), announced)


def make_client(engine, index: int = 0, timeout_s: float = 120.0) -> EngineClient:
    """An ``EngineClient`` for a URL string, a ``vllm.LLM``, or an ``EngineClient`` (passed through)."""
    if isinstance(engine, EngineClient):
        return engine
    if isinstance(engine, str):
        if not engine.startswith(("http://", "https://")):
            raise ValueError(f"trainer_sync: engine {index}: {engine!r} is not an http(s) URL")
        return HttpClient(engine, timeout_s, index)
    if hasattr(engine, "init_weight_transfer_engine") and hasattr(engine, "llm_engine"):
        return LlmClient(engine, index)
    raise TypeError(f"trainer_sync: engine {index} is a {type(engine).__name__}; expected a vllm.LLM or the base URL "
                    f"of a `vllm serve` process")
