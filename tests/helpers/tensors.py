"""Small tensor helpers the tests share."""
from __future__ import annotations

import numpy as np
import torch


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of ``t`` as integers (compare bit for bit, NaN payloads and signed zeros included)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.dtype.itemsize]
    return t.contiguous().view(view).numpy()
