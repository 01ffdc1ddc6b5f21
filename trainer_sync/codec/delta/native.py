"""The native one-pass kernels of delta pushes on CPU (``native.c``), compiled on first use and loaded by ctypes.

Why: delta.py's torch path reads a bucket ~6 times with large temporaries (see the C file); these kernels read it
once. They are an accelerator only: delta.py calls them for contiguous CPU tensors when ``available()`` and keeps
its torch path for CUDA tensors, for a host without a C compiler, and with ``TRAINER_SYNC_NATIVE=0``. Both paths
produce the same bytes (tests/pure/test_delta.py compares them).

The shared object is built with the system C compiler (``$CC``, else ``cc``) into ``$TRAINER_SYNC_CACHE`` (default
``~/.cache/trainer_sync``) under a name that carries the source's hash, so an edited source rebuilds and concurrent
processes (every trainer rank and receiver) never load a half-written file (built in a temporary file, then
renamed). A failed build is remembered for the process and logged once; delta.py then uses torch.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("native.c")
_lib = None
_failed: str | None = None

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "td_sums": (None, [_P, _I64, _I64, _P]),
    "td_scan": (_I64, [_P, _P, _I64, _INT, _P, _P, _I64, _INT, _P, _P, _P, _P]),
    "td_indices": (_I64, [_P, _P, _I64, _P, _INT, _INT, _P, _P]),
    "td_setbits": (None, [_P, _I64, _P]),
    "td_positions": (_I64, [_P, _I64, _INT, _P]),
    "td_bits": (_I64, [_P, _I64, _P, _I64]),
    "td_change": (_INT, [_P, _I64, _I64, _P, _P, _I64, _INT, _P]),
    "td_scatter": (None, [_P, _I64, _P, _P, _I64, _INT]),
}


def _cache_dir() -> Path:
    return Path(os.environ.get("TRAINER_SYNC_CACHE") or Path.home() / ".cache" / "trainer_sync")


def _build() -> Path:
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + platform.machine().encode()).hexdigest()[:16]
    out = _cache_dir() / f"delta_scan-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cc = os.environ.get("CC", "cc")
    try:
        subprocess.run([cc, "-O3", "-shared", "-fPIC", "-std=c99", "-o", tmp, str(_SRC)], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, out)  # atomic: another process sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    try:
        lib = ctypes.CDLL(str(_build()))
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        _lib = lib
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        _failed = f"{e} {detail.decode(errors='replace')[:500]}".strip()
        log.warning("trainer_sync: the native delta kernels did not build (%s); delta pushes use the torch path",
                    _failed)
    return _lib


def enabled() -> bool:
    """Whether the kernels may be used at all (``TRAINER_SYNC_NATIVE=0`` turns them off) and they loaded."""
    return os.environ.get("TRAINER_SYNC_NATIVE", "1") != "0" and _load() is not None


def available(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the kernels: all contiguous on CPU, and the kernels loaded."""
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) and enabled()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def sums(raw: torch.Tensor, start_word: int = 0) -> tuple[int, int, int]:
    """Checksum parts (unsigned) of a flat uint8 tensor whose first 64-bit word is word ``start_word`` of a bucket."""
    out = (ctypes.c_uint64 * 3)()
    _lib.td_sums(_ptr(raw), raw.numel(), start_word, ctypes.addressof(out))
    return tuple(out)


_scratch = threading.local()  # this thread's position / value buffers, kept between scans (no page faults per push)
_KEEP_ENTRIES = 1 << 23  # scratch kept up to 8 M entries (80 MB at 2-byte words); larger ones are freed after use


def _buffers(cap: int, word: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos, vals = getattr(_scratch, "pos", None), getattr(_scratch, "vals", None)
    if pos is None or pos.numel() < cap:
        pos = torch.empty(cap, dtype=torch.int64)
    if vals is None or vals.numel() < cap * word:
        vals = torch.empty(cap * word, dtype=torch.uint8)
    if pos.numel() <= _KEEP_ENTRIES:
        _scratch.pos, _scratch.vals = pos, vals
    return pos, vals


def scan(prev: torch.Tensor, new: torch.Tensor, word: int, update: bool):
    """Changed elements of ``new`` (flat uint8) against ``prev`` (flat uint8, same length) in one pass: (positions
    int64, values (uint8, ``word`` bytes each), checksum change parts (unsigned), filler counts {1: .., 2: .., 4: ..}).
    ``update`` writes the changed words of ``new`` into ``prev``. The positions and values are views of this
    thread's scratch buffers: valid until its next ``scan``."""
    nbytes = new.numel()
    n = nbytes // word
    nq = (nbytes + 7) // 8
    cap = max(4096, n // 32)
    pos, vals = _buffers(cap, word)
    cap = min(pos.numel(), vals.numel() // word)
    resume, last = ctypes.c_int64(0), ctypes.c_int64(0)
    parts = (ctypes.c_uint64 * 3)()
    fill = (ctypes.c_int64 * 3)()
    k = 0
    while True:
        k += _lib.td_scan(_ptr(prev), _ptr(new), nbytes, word, _ptr(pos) + 8 * k, _ptr(vals) + word * k, cap - k,
                          int(update), ctypes.addressof(resume), ctypes.addressof(parts), ctypes.addressof(fill),
                          ctypes.addressof(last))
        if resume.value >= nq:
            break
        # Denser than the buffers: grow to what the density so far predicts for the rest (one regrowth, mostly).
        est = int(k * nq / max(resume.value, 1) * 1.2) + 4096
        cap = min(max(est, 2 * cap), n + 8)
        grown_pos, grown_vals = _buffers(cap, word)
        grown_pos[:k] = pos[:k]
        grown_vals[:k * word] = vals[:k * word]
        pos, vals = grown_pos, grown_vals
    return pos[:k], vals[:k * word], tuple(parts), dict(zip((1, 2, 4), fill))


def indices(pos: torch.Tensor, vals: torch.Tensor, new: torch.Tensor, word: int, width: int,
            gaps_out: torch.Tensor, vals_out: torch.Tensor) -> int:
    """Write the INDICES body (gaps with fillers, values) into ``gaps_out`` / ``vals_out`` (uint8); entries written."""
    return _lib.td_indices(_ptr(pos), _ptr(vals), pos.numel(), _ptr(new), word, width, _ptr(gaps_out),
                           _ptr(vals_out))


def setbits(pos: torch.Tensor, out: torch.Tensor) -> None:
    """Set bit ``p`` of the zeroed bitmask ``out`` (flat uint8) for every position ``p``."""
    _lib.td_setbits(_ptr(pos), pos.numel(), _ptr(out))


def positions(gaps: torch.Tensor, count: int, width: int) -> tuple[torch.Tensor, int]:
    """(positions int64, the last position or -1) from ``count`` gaps of ``width`` bytes (flat uint8)."""
    pos = torch.empty(count, dtype=torch.int64)
    last = _lib.td_positions(_ptr(gaps), count, width, _ptr(pos))
    return pos, last


def bits(packed: torch.Tensor, n: int, cap: int) -> torch.Tensor | None:
    """Positions of the set bits of a bitmask of ``n`` elements; None when more than ``cap`` are set."""
    pos = torch.empty(cap, dtype=torch.int64)
    k = _lib.td_bits(_ptr(packed), n, _ptr(pos), cap)
    return None if k > cap else pos[:k]


def change(dest: torch.Tensor, off: int, pos: torch.Tensor, vals: torch.Tensor, word: int,
           parts: list[int]) -> bool:
    """Add to ``parts`` (unsigned, in place) the checksum change of writing ``vals`` at bucket positions ``pos`` of
    segment ``dest`` (flat, starting at bucket element ``off``). False when a position is outside the segment."""
    acc = (ctypes.c_uint64 * 3)(*parts)
    bad = _lib.td_change(_ptr(dest), off, dest.numel() * dest.element_size() // word, _ptr(pos), _ptr(vals),
                         pos.numel(), word, ctypes.addressof(acc))
    parts[:] = list(acc)
    return not bad


def scatter(dest: torch.Tensor, off: int, pos: torch.Tensor, vals: torch.Tensor, word: int) -> None:
    """``dest`` element ``pos[i] - off`` = ``vals[i]`` (positions checked by ``change`` or the caller)."""
    _lib.td_scatter(_ptr(dest), off, _ptr(pos), _ptr(vals), pos.numel(), word)
