"""An ``ErrorInfo`` across a channel that carries text only: vLLM's RPC.

A worker's failure reaches the trainer as ``str(exception)`` alone (vLLM's executors and its HTTP server pass on
the message, not the object). So the engine side raises ``FramedError``, whose text is the message people read
followed by a frame, ``[trainer_sync-error <base64url JSON of the ErrorInfo>]``, and the trainer's engine client
takes the frame out again (``unframe``) and reads the typed fields from it, through wire.py like every other
message. Nothing is recognised by its wording: the frame is a versioned encoding, and base64url survives the JSON
escaping of an HTTP error body.
"""
from __future__ import annotations

import base64
import re

from . import wire
from .messages import ErrorInfo

_FRAME = re.compile(r"\s*\[trainer_sync-error ([A-Za-z0-9_-]+={0,2})\]")


def frame(info: ErrorInfo) -> str:
    return "[trainer_sync-error " + base64.urlsafe_b64encode(wire.encode(info).encode()).decode() + "]"


class FramedError(RuntimeError):
    """Raised by an engine worker: ``info.message`` for people, then the frame for the trainer's client."""

    def __init__(self, info: ErrorInfo):
        super().__init__(f"{info.message} {frame(info)}")
        self.info = info


def unframe(text: str) -> tuple[str, ErrorInfo | None]:
    """``text`` without its frame, and the ErrorInfo the frame holds (None: the text has no frame, e.g. an error
    of vLLM itself). A frame that does not decode raises wire.ProtocolError."""
    m = _FRAME.search(text)
    if m is None:
        return text, None
    try:
        payload = base64.urlsafe_b64decode(m.group(1)).decode()
    except ValueError:
        raise wire.ProtocolError("an ErrorInfo frame that is not base64url JSON", "ErrorInfo") from None
    return text[:m.start()] + text[m.end():], wire.decode(payload, ErrorInfo)
