"""trainer_sync: move fresh policy weights from an RL trainer into running inference engines, fast and whole.

The map of the package (source -> plan -> codec -> transport -> pipeline -> sender/receiver -> engines -> control)
is ARCHITECTURE.md."""
from .config import SyncConfig
from .engines.clients import EngineClient  # stdlib only: no vLLM import
from .errors import HandshakeMismatch, RendezvousRefused, SyncError
from .protocol.messages import JoinInfo
from .rank.receiver import Receiver
from .protocol.report import SyncReport
from .rank.sender import Sender
from .control import WeightSync

__all__ = ["SyncConfig", "WeightSync", "Sender", "Receiver", "JoinInfo", "SyncReport", "SyncError",
           "HandshakeMismatch", "RendezvousRefused", "EngineClient"]
