"""What a served checkpoint holds: tensor names, shapes and dtypes, read from safetensors headers only.

The engine side of the handshake needs to know, before any byte moves, which tensors the trainer must send. The
checkpoint the engine was started from is the authority: its names are the checkpoint-format names that vLLM's
``load_weights`` takes, and its shapes are the full (unsharded) shapes, which is what every worker of a TP engine
receives. Reading the headers costs a few kilobytes per file, whatever the model size.
"""
from __future__ import annotations

import glob
import json
import os
import struct

import torch

# safetensors dtype codes -> torch dtype names (trainer_sync's plan uses torch names without the "torch." prefix).
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}
# Only these are cast to the served dtype: fp8 weights and their scales of a quantized checkpoint keep theirs.
_CASTABLE = {"float64", "float32", "float16", "bfloat16"}
# Quantization scales are float32 in the checkpoint and stay so in the served model (block-FP8 ``*.weight_scale_inv``,
# per-tensor ``*.weight_scale`` / ``*.input_scale``): never cast them to the served dtype.
_SCALE_SUFFIXES = ("_scale_inv", "_scale")


def read_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, torch dtype name) of one .safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = (tuple(int(s) for s in info["shape"]), _DTYPES.get(info["dtype"], info["dtype"].lower()))
    return out


def find_checkpoint_dir(model: str, revision: str | None = None, download_dir: str | None = None) -> str | None:
    """The local directory holding ``model``'s safetensors files: the path itself, or a cached Hub snapshot."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download

        # The engine already downloaded it to load it: look in the cache only, never fetch here.
        return snapshot_download(model, revision=revision, cache_dir=download_dir, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): no expectations, see expected_tensors
        return None


def expected_tensors(model_dir: str | None, served_dtype: torch.dtype | str | None = None
                     ) -> dict[str, tuple[tuple[int, ...], str | None]] | None:
    """What the trainer must send for this checkpoint: name -> (shape, dtype).

    Floating tensors expect ``served_dtype`` (the dtype the engine runs in), so that with ``wire_dtype="auto"`` an
    fp32 trainer packs bf16 for a bf16 engine and halves the bytes on the wire. Returns None when the directory
    holds no safetensors files (a .bin-only checkpoint): the receiver then accepts any plan, unchecked.
    """
    if model_dir is None:
        return None
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):  # some repos also ship a consolidated copy beside the shards: trust the index
        with open(index) as f:
            shards = set(json.load(f)["weight_map"].values())
        files = [p for p in files if os.path.basename(p) in shards]
    if not files:
        return None
    served = None if served_dtype is None else str(served_dtype).removeprefix("torch.")
    out: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for path in files:
        for name, (shape, dtype) in read_header(path).items():
            cast = served and dtype in _CASTABLE and not name.endswith(_SCALE_SUFFIXES)
            out[name] = (shape, served if cast else dtype)
    return out
