"""Control: WeightSync, the one object a trainer uses (weight_sync.py), driving the engines through their clients."""
from .weight_sync import WeightSync

__all__ = ["WeightSync"]
