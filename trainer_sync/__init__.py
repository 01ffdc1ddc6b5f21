"""trainer_sync: move fresh policy weights from an RL trainer into running inference engines, fast and whole."""
from .config import SyncConfig
from .errors import HandshakeMismatch, RendezvousRefused, SyncError
from .plan import BucketPlan, Expected
from .receiver import Receiver
from .report import SyncReport
from .protocol import JoinInfo
from .sender import Sender
from .sync import WeightSync

__all__ = ["SyncConfig", "WeightSync", "Sender", "Receiver", "JoinInfo", "SyncReport", "SyncError",
           "HandshakeMismatch", "RendezvousRefused", "BucketPlan", "Expected"]
