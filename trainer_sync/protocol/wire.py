"""The one place protocol messages become JSON and back, and are checked on the way in.

Every message (protocol/messages.py) is a dataclass with a ``protocol_version`` field. On the wire it is a JSON
object ``{"type": <class name>, "protocol_version": n, <fields>}``. ``from_wire`` refuses, with a ``ProtocolError``
naming the message and the field, an object of another type than the reader expects, a version this package does
not speak, a missing required field and a field it does not know: a trainer and an engine of different trainer_sync
releases fail at the first message with a clear error instead of misreading each other.

Fields holding other messages (an ``Ack``'s ``ErrorInfo``) or tuples (an ``Expected``'s shapes) are declared by
their class in ``WIRE_DECODE`` (field name -> function of the JSON value). ``put`` / ``read`` / ``read_if`` write
and read a message under a key of the bridging group's store (anything with torch.distributed.Store's ``set``,
``get`` and ``check``): every value in that store that trainer and engines exchange goes through them or through
``encode``/``decode``. Only the standard library and errors.py: a vLLM worker imports this without the trainer side.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import SyncError

# The protocol versions this package reads; every message it writes carries PROTOCOL_VERSION.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)


class ProtocolError(SyncError, ValueError):
    """A message that this package cannot read: another type than expected, an unknown protocol version, a missing
    or unknown field. ``message_type`` and ``field`` name what was wrong, as data."""

    def __init__(self, message: str, message_type: str, field: str = "", stage: str = ""):
        super().__init__(f"trainer_sync protocol: {message}", stage=stage)
        self.message_type = message_type
        self.field = field


def to_wire(msg: Any) -> dict:
    """The JSON-able dict of a message: its type, then its fields (nested messages as their own dicts)."""
    out: dict = {"type": type(msg).__name__}
    for f in dataclasses.fields(msg):
        out[f.name] = _plain(getattr(msg, f.name))
    return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_wire(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def encode(msg: Any) -> str:
    return json.dumps(to_wire(msg))


def _a(name: str) -> str:
    return ("an " if name[:1] in "AEIOU" else "a ") + name


def from_wire(obj: Any, *types: type, stage: str = "") -> Any:
    """The message ``obj`` holds, which must be of one of ``types`` (checked: type, version, fields)."""
    names = " or ".join(t.__name__ for t in types)
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected {_a(names)} message, got {type(obj).__name__} {str(obj)[:80]!r}", names,
                            stage=stage)
    kind = obj.get("type")
    cls = next((t for t in types if t.__name__ == kind), None)
    if cls is None:
        raise ProtocolError(f"expected {_a(names)} message, got " + (_a(str(kind)) if kind else "one without a type"),
                            names, "type", stage)
    version = obj.get("protocol_version")
    if version is None:
        raise ProtocolError(f"{kind} message without field 'protocol_version'", kind, "protocol_version", stage)
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"{kind} message of protocol version {version!r}; this trainer_sync reads version(s) "
                            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (trainer and engines must run compatible "
                            f"trainer_sync releases)", kind, "protocol_version", stage)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - set(fields) - {"type"})
    if unknown:
        raise ProtocolError(f"{kind} message with unknown field {unknown[0]!r}", kind, unknown[0], stage)
    decode_field = getattr(cls, "WIRE_DECODE", {})
    values = {}
    for name, f in fields.items():
        if name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{kind} message without field {name!r}", kind, name, stage)
            continue
        value = obj[name]
        values[name] = decode_field[name](value) if name in decode_field and value is not None else value
    return cls(**values)


def decode(text: str | bytes, *types: type, stage: str = "") -> Any:
    """The message in JSON ``text`` (see ``from_wire``)."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        names = " or ".join(t.__name__ for t in types)
        raise ProtocolError(f"{_a(names)} message that is not JSON ({e})", names, stage=stage) from None
    return from_wire(obj, *types, stage=stage)


def put(store: Any, key: str, msg: Any) -> None:
    """Write message ``msg`` under ``key`` of ``store`` (a torch.distributed Store, or anything with its ``set``)."""
    store.set(key, encode(msg))


def read(store: Any, key: str, *types: type, stage: str = "") -> Any:
    """The message under ``key`` of ``store``, which must be there, of one of ``types`` (see ``from_wire``)."""
    return decode(store.get(key), *types, stage=stage)


def read_if(store: Any, key: str, *types: type, stage: str = "") -> Any:
    """The message under ``key`` of ``store``, or None when nobody wrote one (a check, then a get: no wait)."""
    return read(store, key, *types, stage=stage) if store.check([key]) else None
