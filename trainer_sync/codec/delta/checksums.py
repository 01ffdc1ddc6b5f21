"""Delta checksums: what a receiver checks before and after it applies a delta (issue 16).

A delta carries ``base`` and ``target``: position-weighted 64-bit checksums of the bucket's previous and new bytes.
A receiver whose destination does not hold the base refuses (``DeltaBaseMismatch``) before writing anything, so a
receiver that is not at the base version can never apply a wrong delta, and with ``verify`` it checks the result.

The checksum is three wrapping int64 sums over the bytes read as 64-bit words (plain, weighted by 8 KiB row and by
column; ``Sums``), so the new sums follow from the old ones and the changed words alone (``delta_parts``): a sender
that keeps each bucket's sums never re-reads a sparse bucket to checksum it, and a receiver checks a sparse delta's
result before writing anything. Segments at 8-byte offsets add up to their bucket (padding counts as zeros), so a
receiver checksums its destination slices without assembling the bucket. On CPU the sums are one native pass
(native.c ``td_sums``), elsewhere two torch reductions (``checksum_parts``); both give the same numbers.

This is the package's one tensor checksum: the vLLM fast path proves its placement with ``checksum_parts`` too.
"""
from __future__ import annotations

import torch

from . import native

WORD_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer view of each word size
_MASK64 = (1 << 64) - 1
ROW = 1024  # checksum row length (64-bit words)
_MIX = 0x9E3779B97F4A7C15
_MIX2 = 0xC2B2AE3D27D4EB4F


class DeltaError(ValueError):
    """A delta that cannot be applied (malformed, or not for this destination)."""


class DeltaBaseMismatch(DeltaError):
    """The destination does not hold the values the delta was computed against (the receiver is not at the base
    version): nothing was written; the receiver needs a full push."""



def words(t: torch.Tensor, word: int | None = None) -> torch.Tensor:
    """A flat integer view (``word`` bytes per element) of a contiguous tensor's bits; no copy."""
    if not t.is_contiguous():
        raise DeltaError("delta: tensors must be contiguous (they are viewed as raw words in place)")
    flat = t.reshape(-1)
    if word is None:
        word = flat.element_size()
    if flat.element_size() == word and flat.dtype == WORD_DTYPE[word]:
        return flat
    raw = flat.view(torch.uint8)
    if raw.numel() % word:
        raise DeltaError(f"delta: {raw.numel()} bytes are not a whole number of {word}-byte words")
    return raw.view(WORD_DTYPE[word])



def checksum_parts(w: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[sum, row-weighted sum, column-weighted sum] (int64, wrapping modulo 2**64; a device tensor, nothing
    synchronized) of the bytes of ``w`` read as little-endian 64-bit words, the last one zero-padded, for bytes that
    sit at byte ``offset`` (a multiple of 8) of a bucket. Word ``i`` of the bucket is in row ``i // 1024`` and column
    ``i % 1024``; it weighs row + 1 in the second sum and column + 1 in the third, so two words trade places unseen
    only if they are the same word, and the parts of segments add up to the parts of their bucket when the bytes
    between them are zeros. Two passes over the bytes (row sums, column sums)."""
    if offset % 8:
        raise DeltaError(f"delta: checksummed segments must start at 8-byte offsets, not {offset}")
    raw = w.reshape(-1).view(torch.uint8)
    whole = raw.numel() // 8
    q = raw[:whole * 8].view(torch.int64)
    if raw.numel() % 8:
        last = torch.zeros(8, dtype=torch.uint8, device=raw.device)
        last[:raw.numel() % 8] = raw[whole * 8:]
        q = torch.cat([q, last.view(torch.int64)])
    n, R, start = q.numel(), ROW, offset // 8
    dev = q.device

    def ramp(lo: int, hi: int) -> torch.Tensor:
        return torch.arange(lo + 1, hi + 1, device=dev, dtype=torch.int64)

    head = min((-start) % R, n)  # words before the first row boundary
    first = (start + head) // R
    rows = (n - head) // R
    tail = n - head - rows * R
    hq, body, tq = q[:head], q[head:head + rows * R].view(rows, R), q[head + rows * R:]
    h_col, t_row = start % R, first + rows
    rs, hs, ts = body.sum(1), hq.sum(), tq.sum()
    total = hs + rs.sum() + ts
    by_row = hs * (start // R + 1) + (rs * ramp(first, first + rows)).sum() + ts * (t_row + 1)
    by_col = (hq * ramp(h_col, h_col + head)).sum() + (body.sum(0) * ramp(0, R)).sum() + (tq * ramp(0, tail)).sum()
    return torch.stack([total, by_row, by_col])


def _mix(parts) -> int:
    total, by_row, by_col = (int(x) & _MASK64 for x in parts)
    return (total + by_row * _MIX + by_col * _MIX2) & _MASK64


class Sums(tuple):
    """The three checksum sums (each modulo 2**64) of a bucket's bytes; ``mixed`` is the 64-bit checksum."""

    def __new__(cls, parts):
        return super().__new__(cls, tuple(int(x) & _MASK64 for x in parts))

    @property
    def mixed(self) -> int:
        return _mix(self)

    def plus(self, delta) -> "Sums":
        return Sums(a + int(b) for a, b in zip(self, delta))


def sums(t: torch.Tensor) -> Sums:
    """The checksum sums of a whole bucket (one synchronization; on CPU one native pass)."""
    return views_sums([(0, words(t))])


def delta_parts(pos: torch.Tensor, old: torch.Tensor, new: torch.Tensor, word: int) -> torch.Tensor:
    """How the checksum sums change when the words at ``pos`` go from ``old`` to ``new`` (O(changed), a device
    tensor): word ``p`` is byte ``p * word``, i.e. 64-bit word ``p * word // 8`` shifted by ``8 * (p * word % 8)``
    bits."""
    per = 8 // word
    if word < 8:
        span = (1 << (8 * word)) - 1
        d = (new.to(torch.int64) & span) - (old.to(torch.int64) & span)  # unsigned difference
        if per > 1:
            d <<= (pos & (per - 1)) * (8 * word)
    else:
        d = new - old
    q = pos >> (per.bit_length() - 1)
    row = (q >> 10) + 1
    col = (q & (ROW - 1)) + 1
    return torch.stack([d.sum(), (d * row).sum(), (d * col).sum()])


def incremental_pays(changed: int, n: int) -> bool:
    """Whether updating the sums from the changes beats a pass over all words (measured on CPU: ~30 ns per changed
    word against ~0.6 ns per word of a bf16 bucket for the full pass)."""
    return changed * 48 < n


def checksum(t: torch.Tensor, word: int | None = None) -> int:
    """A position-weighted 64-bit checksum of a tensor's bytes: the wrapping sum of its little-endian 64-bit words
    mixed with the sum of each 8 KiB row's sum times the row number, so changed, swapped or shifted values are all
    seen. (``word`` is accepted for symmetry; the checksum depends on the bytes only.)"""
    return sums(words(t, word)).mixed



def views_sums(views: list[tuple[int, torch.Tensor]]) -> Sums:
    if not views:
        return Sums((0, 0, 0))
    if all(native.available(v) for _, v in views):
        total = [0, 0, 0]
        for off, v in views:
            start = off * v.element_size()
            if start % 8:
                raise DeltaError(f"delta: checksummed segments must start at 8-byte offsets, not {start}")
            total = [x + y for x, y in zip(total, native.sums(v.view(torch.uint8), start // 8))]
        return Sums(total)
    device = views[0][1].device
    return Sums(torch.stack([checksum_parts(v, off * v.element_size()).to(device)
                             for off, v in views]).sum(0).tolist())


def segments_sums(segments: list[tuple[int, torch.Tensor]]) -> Sums:
    """The checksum sums of a bucket holding these ``(byte_offset, tensor)`` segments and zeros elsewhere (the
    checksum depends on the bytes only: no word size needed)."""
    return views_sums([(off, words(t, 1)) for off, t in segments])


def segments_checksum(views: list[tuple[int, torch.Tensor]]) -> int:
    """The checksum of a bucket holding these ``(word_offset, words)`` segments and zeros elsewhere."""
    return views_sums(views).mixed

