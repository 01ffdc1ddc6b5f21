"""The push protocol (protocol/messages.py, protocol/delta.py, protocol/lora.py, protocol/wire.py,
protocol/error_frame.py): every message survives the trip through JSON, and through the bridging group's store
(wire.put / wire.read); a message of an unknown version, a missing or unknown field, or of another type is refused with
a ProtocolError naming the message and the field; an error's typed fields survive the trip, through vLLM's
text-only RPC and an HTTP error body too."""
from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from trainer_sync.engines.clients import EngineCallError
from trainer_sync.errors import UNTOUCHED, Aborted, HandshakeMismatch, SyncError
from trainer_sync.protocol import wire
from trainer_sync.protocol.delta import DeltaState, PushStats
from trainer_sync.protocol.error_frame import FramedError, unframe
from trainer_sync.protocol.lora import LoraOffer, LoraSupport
from trainer_sync.protocol.messages import (Ack, CatchupOffer, ErrorInfo, ErrorKind, Expected, JoinInfo, Keys,
                                            LayoutAnnouncement, PassVerdict, Pieces, PlanOffer, PlanRefusal,
                                            ServedVersion, UpdateSession, Verdict, WireFp8Decision)
from trainer_sync.protocol.wire import PROTOCOL_VERSION, ProtocolError

ERROR = ErrorInfo(ErrorKind.FAILED, "RuntimeError: boom in model.layers.0.weight", engine="engine 1 (x)",
                  parameter="model.layers.0.weight", receiver=3, stage="apply")

MESSAGES = [
    JoinInfo("127.0.0.1", 29500, "secret", 2, 4, 8, 1, "gloo", 30.0, 5.0, 60.0, wire_dtype="fp8",
             engine_apply="layerwise", fp8_rules={"exclude": ["lm_head"]}, delta="on", delta_mirror_mb=64.0),
    Expected({"a.weight": ((4, 8), "bfloat16"), "b": ((3,), None)}),
    Expected(),
    ERROR,
    ErrorInfo(ErrorKind.UNTOUCHED, "nothing applied"),
    Pieces([["a.weight", [4, 8], "bfloat16", 0, 32]], ["b"]),
    PlanOffer('{"buckets": []}', 2, 7, "memory budget: 1 buffer", {"on": True, "base": 6}),
    PlanOffer('{"buckets": []}', 1, 1),
    PlanRefusal(["receiver 0: a.weight is [4, 8], expected [8, 4]"], [0]),
    Ack(0.5, 1.5, DeltaState("d", 3, True, late=True), "direct"),
    Ack(error=ERROR, trace="Traceback ..."),
    PassVerdict("base checksum of bucket 3 does not match"),
    PassVerdict(),
    CatchupOffer(5, '{"buckets": []}', 4),
    CatchupOffer(None),
    LayoutAnnouncement('{"n": 2, "local": [[], []]}'),
    LayoutAnnouncement(error=ErrorInfo(ErrorKind.FAILED, "no GPU report from receiver 1", stage="rendezvous")),
    Verdict("trainer_sync push failed", "transfer", "engine 0", members=["engine 0"], dead=["engine 0"],
            refused=["line"], receivers=[1], changed=True, data={"offsets": [0, 2], "engine_version": 4}),
    Verdict(),
    DeltaState("0123456789abcdef", 4, True),
    DeltaState(None, None, False, "it keeps no delta mirror"),
    PushStats(1048, 4096, 12, 2048, {"bitmask": 1, "uncached": 1}),
    PushStats(4096, 4096, full_reason="first push (no base version yet)"),
    UpdateSession(True),
    UpdateSession(),
    WireFp8Decision(True),
    ServedVersion(7),
    ServedVersion(),
    LoraSupport(True, 16, 2, ["model.layers.0.self_attn.q_proj"], {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
                "bfloat16"),
    PlanOffer('{"buckets": []}', 2, 3, lora=LoraOffer("adapter", "policy", 1, {"r": 8}, why="SyncConfig.lora")),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_trip(msg):
    text = wire.encode(msg)
    assert json.loads(text)["type"] == type(msg).__name__
    assert json.loads(text)["protocol_version"] == PROTOCOL_VERSION
    assert wire.decode(text, type(msg)) == msg


def test_join_info_travels_as_the_dict_vllm_passes_on():
    info = MESSAGES[0]
    assert wire.from_wire(json.loads(json.dumps(info.to_dict())), JoinInfo) == info
    assert "secret" not in repr(info)  # the token is never printed


def test_the_reader_picks_one_of_the_types_it_expects():
    for msg in (MESSAGES[6], MESSAGES[8]):
        assert wire.decode(wire.encode(msg), PlanOffer, PlanRefusal) == msg
    with pytest.raises(ProtocolError) as err:
        wire.decode(wire.encode(MESSAGES[9]), PlanOffer, PlanRefusal)
    assert "expected a PlanOffer or PlanRefusal message, got an Ack" in str(err.value)
    assert (err.value.message_type, err.value.field) == ("PlanOffer or PlanRefusal", "type")


def test_an_unknown_version_is_refused_naming_message_and_field():
    obj = wire.to_wire(Ack(1.0, 2.0))
    obj["protocol_version"] = 99
    with pytest.raises(ProtocolError) as err:
        wire.from_wire(obj, Ack, stage="apply")
    assert "Ack message of protocol version 99" in str(err.value) and "reads version(s) 1" in str(err.value)
    assert (err.value.message_type, err.value.field, err.value.stage) == ("Ack", "protocol_version", "apply")
    assert isinstance(err.value, SyncError) and isinstance(err.value, ValueError)
    del obj["protocol_version"]
    with pytest.raises(ProtocolError, match="Ack message without field 'protocol_version'"):
        wire.from_wire(obj, Ack)


def test_a_missing_field_is_named():
    obj = wire.to_wire(MESSAGES[0])
    del obj["port"]
    with pytest.raises(ProtocolError) as err:
        wire.from_wire(obj, JoinInfo)
    assert "JoinInfo message without field 'port'" in str(err.value)
    assert (err.value.message_type, err.value.field) == ("JoinInfo", "port")
    nested = wire.to_wire(Ack(error=ERROR))
    del nested["error"]["kind"]
    with pytest.raises(ProtocolError, match="ErrorInfo message without field 'kind'"):
        wire.from_wire(nested, Ack)


def test_an_unknown_field_or_a_non_message_is_named():
    obj = dict(wire.to_wire(Pieces([], [])), colour="red")
    with pytest.raises(ProtocolError) as err:
        wire.from_wire(obj, Pieces)
    assert "Pieces message with unknown field 'colour'" in str(err.value) and err.value.field == "colour"
    with pytest.raises(ProtocolError, match="expected a Pieces message, got list"):
        wire.from_wire([1, 2], Pieces)
    with pytest.raises(ProtocolError, match="a Pieces message that is not JSON"):
        wire.decode("{nope", Pieces)


def test_an_error_keeps_its_typed_fields_through_an_ack():
    ack = wire.decode(wire.encode(Ack(error=ERROR)), Ack)
    assert ack.failed and ack.error == ERROR
    assert (ack.error.kind, ack.error.parameter, ack.error.receiver, ack.error.stage) == \
        (ErrorKind.FAILED, "model.layers.0.weight", 3, "apply")


def test_error_info_of_an_exception():
    assert ErrorInfo.of(HandshakeMismatch(["x"])).kind == ErrorKind.REFUSED
    assert ErrorInfo.of(Aborted("gone", stage="transfer")) == \
        ErrorInfo(ErrorKind.ABORTED, "Aborted: gone", stage="transfer")
    e = ErrorInfo.of(SyncError("bad", stage="apply", parameter="w"), receiver=2)
    assert (e.kind, e.message, e.parameter, e.receiver, e.stage) == \
        (ErrorKind.FAILED, "SyncError: bad", "w", 2, "apply")
    assert ErrorInfo.of(ValueError()).message.startswith("ValueError")  # no message: where it was raised


def engine_error(detail: str) -> EngineCallError:
    return EngineCallError("engine 0 (http://h:8000)", "update_weights", detail)


def test_an_engine_error_crosses_vllms_text_only_rpc_typed():
    """A worker raises FramedError; vLLM passes on its text alone (in-process: the text; HTTP: inside a JSON error
    body, escaped); the trainer's client reads the typed fields back and people read the message, frame removed."""
    info = ErrorInfo(ErrorKind.UNTOUCHED, f'RuntimeError: trainer_sync: "no" receiver\n  worker 1 {UNTOUCHED}')
    raised = FramedError(info)
    for text in (str(raised), f"RuntimeError: {raised}",
                 "HTTP 500: " + json.dumps({"error": {"message": str(raised), "type": "Internal"}})):
        err = engine_error(text)
        assert err.info == ErrorInfo(ErrorKind.UNTOUCHED, info.message, engine="engine 0 (http://h:8000)")
        assert "trainer_sync-error" not in str(err) and "trainer_sync-error" not in err.detail
    assert str(engine_error(str(raised))) == f"engine 0 (http://h:8000): update_weights failed: {info.message}"


def test_an_error_is_never_recognised_by_its_text():
    """Text that says every word of an untouched failure, without the typed frame, is no typed error."""
    err = engine_error(f"RuntimeError: update_weights before init_weight_transfer_engine {UNTOUCHED}")
    assert err.info is None and UNTOUCHED in str(err)


def test_a_broken_frame_is_a_clear_protocol_problem():
    text, info = unframe("boom")
    assert (text, info) == ("boom", None)
    with pytest.raises(ProtocolError, match="ErrorInfo"):
        unframe("boom [trainer_sync-error e30=]")  # base64 of "{}": an ErrorInfo without fields
    err = engine_error("boom [trainer_sync-error e30=]")
    assert err.info is None and "expected an ErrorInfo message, got one without a type" in err.detail


def test_a_hand_written_join_info_dict_is_read_and_its_missing_field_named():
    """Users build a receiver's info by hand (recipes/core_demo.py, the README's Sender/Receiver snippet): a dict
    without the wire's ``type`` reads as this release's JoinInfo; one missing a field is refused naming it."""
    hand = dict(host="127.0.0.1", port=29500, token="t", epoch=0, num_trainers=2, num_receivers=1, receiver_rank=0,
                backend="gloo", timeout_s=30.0)
    info = JoinInfo.read(hand)
    assert (info.port, info.num_trainers, info.protocol_version) == (29500, 2, PROTOCOL_VERSION)
    assert JoinInfo.read(info.to_dict()) == info and JoinInfo.read(info) is info
    with pytest.raises(ProtocolError, match="without field 'port'") as e:
        JoinInfo.read({k: v for k, v in hand.items() if k != "port"})
    assert e.value.field == "port"
    with pytest.raises(ProtocolError, match="unknown field 'prot'"):
        JoinInfo.read(dict(hand, prot=1))


def test_store_values_travel_through_wire_put_and_read():
    """Every value trainer and engines leave in the bridging group's store is a message written by wire.put and
    read by wire.read / read_if (a real torch.distributed store: bytes back), checked like any other."""
    store = dist.HashStore()
    for key, msg in [(Keys.delta_state(0), DeltaState("d", 2, True)), (Keys.delta_stats("p0/", 1), PushStats(5, 9)),
                     (Keys.open_session(3), UpdateSession(True)), (Keys.WIRE_FP8, WireFp8Decision(False)),
                     (Keys.expected(1), Expected()), (Keys.served_version(0), ServedVersion(3))]:
        wire.put(store, key, msg)
        assert wire.read(store, key, type(msg)) == msg == wire.read_if(store, key, type(msg))
    assert wire.read_if(store, Keys.delta_state(9), DeltaState) is None  # nobody wrote it: no wait, no error
    stats = wire.read(store, Keys.delta_stats("p0/", 1), PushStats)
    stats.sent += 1  # the codec counts into it as the push goes
    assert stats == PushStats(6, 9)


@pytest.mark.parametrize("raw, cls, says", [
    ("true", UpdateSession, "expected an UpdateSession message, got bool"),  # what an older release wrote
    ("false", WireFp8Decision, "expected a WireFp8Decision message, got bool"),
    ('{"digest": "d", "version": 1, "ok": true, "why": ""}', DeltaState, "expected a DeltaState message, got one "
                                                                         "without a type"),
    ('{"sent": 1, "full": 1}', PushStats, "expected a PushStats message, got one without a type"),
    ('"{\\"type\\": \\"Expected\\"}"', Expected, "expected an Expected message, got str"),  # double-encoded
    ("null", Expected, "expected an Expected message, got NoneType"),
])
def test_a_raw_store_value_is_refused_naming_the_message(raw, cls, says):
    store = dist.HashStore()
    store.set("k", raw)
    with pytest.raises(ProtocolError, match=says) as err:
        wire.read(store, "k", cls, stage="handshake")
    assert err.value.message_type == cls.__name__ and err.value.stage == "handshake"


def test_an_acks_delta_state_is_a_checked_message_too():
    ack = wire.decode(wire.encode(MESSAGES[9]), Ack)
    assert isinstance(ack.delta_state, DeltaState) and ack.delta_state.late and ack.delta_state.version == 3
    obj = wire.to_wire(MESSAGES[9])
    obj["delta_state"]["colour"] = "red"
    with pytest.raises(ProtocolError, match="DeltaState message with unknown field 'colour'") as err:
        wire.from_wire(obj, Ack)
    assert (err.value.message_type, err.value.field) == ("DeltaState", "colour")
    obj["delta_state"] = {"digest": "d", "version": 3, "ok": True, "why": ""}  # the untyped dict of old
    with pytest.raises(ProtocolError, match="expected a DeltaState message, got one without a type"):
        wire.from_wire(obj, Ack)
