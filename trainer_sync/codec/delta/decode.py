"""Delta decoding: check a delta buffer against its destination and write it in place (issue 16).

``decode_into`` (one flat destination) and ``apply_segments`` (a bucket whose words live in several tensors: a
receiver's destination slices) both check the base checksum, the positions and, with ``verify``, the result's
checksum from the changes alone before writing anything; ``changes`` gives a buffer's positions and values. On CPU
the positions come from the native kernels, elsewhere from torch; both give the same result.
"""
from __future__ import annotations

import torch

from . import native
from .checksums import WORD_DTYPE, DeltaBaseMismatch, DeltaError, Sums, delta_parts, sums, views_sums, words
from .format import FULL, BITMASK, GAP_WIDTHS, HEADER_BYTES, KIND_NAMES, Header, gaps_from_bytes, pad8, unpack_bits


def _values(buf: torch.Tensor, h: Header) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(positions int64, sorted, or None for FULL; values) of an encoded buffer. On CPU the positions come from the
    native kernels (a running sum of unsigned gaps, or the set bits), else from torch."""
    dt = WORD_DTYPE[h.word]
    body = HEADER_BYTES
    if h.kind == FULL:
        return None, buf[body:body + h.n * h.word].view(dt)
    fast = native.available(buf)
    if h.kind == BITMASK:
        nb = -(-h.n // 8)
        at = body + pad8(nb)
        vals = buf[at:at + h.count * h.word].view(dt)
        if fast:
            pos = native.bits(buf[body:body + nb], h.n, h.count)
            if pos is None:
                raise DeltaError(f"delta: the bitmask sets more than its {h.count} values (corrupt buffer)")
        else:
            pos = torch.nonzero(unpack_bits(buf[body:body + nb], h.n)).view(-1)
        return pos, vals
    if h.gap_width not in GAP_WIDTHS:
        raise DeltaError(f"delta: gap width {h.gap_width} is not one of {GAP_WIDTHS}")
    at = body + pad8(h.count * h.gap_width)
    if fast:
        pos, _ = native.positions(buf[body:], h.count, h.gap_width)
    else:
        pos = torch.cumsum(gaps_from_bytes(buf[body:], h.count, h.gap_width), 0)
    return pos, buf[at:at + h.count * h.word].view(dt)


def _check_positions(pos: torch.Tensor, vals: torch.Tensor, n: int) -> None:
    """Positions inside the bucket, one per value (positions are sorted by construction, unless a 4-byte gap is
    negative in a corrupt buffer: min and max are both checked)."""
    if pos.numel() != vals.numel():
        raise DeltaError(f"delta: {pos.numel()} positions but {vals.numel()} values (corrupt buffer)")
    if pos.numel():
        lo, hi = (int(x) for x in torch.stack([pos.min(), pos.max()]).tolist())
        if lo < 0 or hi >= n:
            raise DeltaError(f"delta: positions {lo}..{hi} outside the bucket's {n} words (corrupt buffer)")


def _check_buffer(buf: torch.Tensor, h: Header) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise DeltaError("delta: the encoded buffer must be a flat uint8 tensor")
    if buf.numel() < h.nbytes:
        raise DeltaError(f"delta: buffer holds {buf.numel()} bytes, its header says {h.nbytes}")
    # The sections the header describes must fill exactly the bytes it says (the native kernels read count gaps and
    # values without bounds of their own: a corrupt count must not send them past the buffer).
    if h.kind == FULL:
        want = HEADER_BYTES + h.n * h.word
    elif h.kind == BITMASK:
        want = HEADER_BYTES + pad8(-(-h.n // 8)) + h.count * h.word
    else:
        want = HEADER_BYTES + pad8(h.count * h.gap_width) + h.count * h.word
    if h.n < 0 or h.count < 0 or want != h.nbytes:
        raise DeltaError(f"delta: header says {h.nbytes} bytes but its {KIND_NAMES[h.kind]} sections take {want} "
                         f"(n {h.n}, count {h.count}; corrupt buffer)")


def _change(cuts, pos: torch.Tensor, vals: torch.Tensor, word: int) -> list:
    """The checksum parts' change of writing ``vals`` at ``pos`` into the segments (O(changed); native on CPU)."""
    parts = [0, 0, 0]
    for (off, v), a, z in cuts:
        if z <= a:
            continue
        if native.available(v, pos, vals):
            if not native.change(v, off, pos[a:z], vals[a:z], word, parts):
                raise DeltaError("delta: a position falls outside its segment (corrupt buffer)")
        else:
            p = pos[a:z]
            d = delta_parts(p, v[(p - off).to(v.device)].to(pos.device), vals[a:z], word).tolist()
            parts = [x + y for x, y in zip(parts, d)]
    return parts


def _write(cuts, pos: torch.Tensor, vals: torch.Tensor, word: int) -> None:
    for (off, v), a, z in cuts:
        if z <= a:
            continue
        if native.available(v, pos, vals):
            native.scatter(v, off, pos[a:z], vals[a:z], word)
        else:
            v.index_copy_(0, (pos[a:z] - off).to(v.device), vals[a:z].to(v.device))


def _cuts(views: list[tuple[int, torch.Tensor]], pos: torch.Tensor) -> list:
    """Each segment with the range ``[a, z)`` of the sorted positions that fall in it."""
    if not views:
        return []
    starts = [off for off, _ in views]
    ends = [off + v.numel() for off, v in views]
    bounds = torch.searchsorted(pos, torch.tensor(starts + ends, device=pos.device)).tolist()
    k = len(views)
    return list(zip(views, bounds[:k], bounds[k:]))


def decode_into(dest: torch.Tensor, buf: torch.Tensor, *, verify: bool = True, header: Header | None = None) -> Header:
    """Apply an encoded buffer IN PLACE to ``dest`` (contiguous, holding the previous values; any dtype of the same
    bytes). Refuses with ``DeltaBaseMismatch`` when ``dest`` does not hold the base values, before writing anything.
    ``verify`` checks the result's checksum too (``DeltaError``: a corrupt buffer), from the changes alone, before
    writing. Cost beyond the writes: one read of ``dest`` for the base check, and O(changed) for the target."""
    h = header or Header.unpack(buf)
    _check_buffer(buf, h)
    d = words(dest, h.word)
    if d.numel() != h.n:
        raise DeltaError(f"delta: destination holds {d.numel()} words of {h.word} bytes, the delta {h.n}")
    if buf.device != d.device:
        buf = buf.to(d.device)
    return _apply([(0, d)], buf, h, verify)


def changes(buf: torch.Tensor) -> tuple[Header, torch.Tensor, torch.Tensor]:
    """(header, positions int64, values) of an encoded buffer, for destinations that are not one flat tensor
    (``apply_segments``). FULL gives every position."""
    h = Header.unpack(buf)
    _check_buffer(buf, h)
    pos, vals = _values(buf, h)
    if pos is None:
        pos = torch.arange(h.n, device=buf.device)
    return h, pos, vals


def apply_segments(segments: list[tuple[int, torch.Tensor]], buf: torch.Tensor, *, verify: bool = True,
                   base: Sums | None = None) -> Header:
    """Apply an encoded buffer to a bucket whose words live in several tensors: ``segments`` lists
    ``(word_offset, dest)`` (``dest`` contiguous, in place; each segment at an 8-byte offset). Words of the bucket
    outside every segment (alignment padding) belong to nobody: they are skipped, and the checksums count them as
    zeros, so the sender must keep its padding zero (``checksum`` of its bucket then equals ``segments_checksum`` of
    the receiver's segments). ``DeltaBaseMismatch`` / ``DeltaError`` as in ``decode_into``, before any write.
    ``base``: the segments' ``segments_sums`` if already taken (a receiver takes them while the bucket is still on
    the wire); they must be of the segments as they are now."""
    h = Header.unpack(buf)
    _check_buffer(buf, h)
    views = sorted(((off, words(t, h.word)) for off, t in segments), key=lambda x: x[0])
    return _apply(views, buf, h, verify, base)


def _apply(views: list[tuple[int, torch.Tensor]], buf: torch.Tensor, h: Header, verify: bool,
           base: Sums | None = None) -> Header:
    """decode_into / apply_segments: check the base, the positions and (``verify``) the result, then write."""
    pos, vals = _values(buf, h)
    if h.kind == FULL:  # whole slices; the values (padding included, zero) must carry the target checksum
        if verify and sums(vals).mixed != h.target:
            raise DeltaError("delta: the full values do not have the target checksum (corrupt buffer); nothing "
                             "was written")
        for off, v in views:
            v.copy_(vals[off:off + v.numel()])
        return h
    base = base if base is not None else views_sums(views)
    if base.mixed != h.base:
        raise DeltaBaseMismatch(f"delta: the destination does not hold the base values (checksum {base.mixed:#x}, "
                                f"the delta was made against {h.base:#x}); it needs a full push")
    _check_positions(pos, vals, h.n)
    cuts = _cuts(views, pos)
    if verify:  # before any write, from the changes
        got = base.plus(_change(cuts, pos, vals, h.word)).mixed
        if got != h.target:
            raise DeltaError(f"delta: the result's checksum {got:#x} would not be the target {h.target:#x} "
                             f"(corrupt buffer, or changes outside the destination); nothing was written")
    _write(cuts, pos, vals, h.word)
    return h


