"""Delta pushes: send only the wire elements that changed since the version a receiver serves (issue 16).

Why it pays
-----------
RL fine-tuning moves fp32 master weights by ~1e-6..1e-5 a step while the engine serves bf16, whose spacing near
typical weight magnitudes is ~2**-8 relative: most bf16 elements are bit-identical between consecutive versions
(benchmarks/bench_delta.py measures the fraction over real AdamW steps). A bucket whose new wire values differ from
the previous ones in a fraction ``f`` of its ``n`` elements (``word`` bytes each) can travel as

* ``FULL``    every value:                                   ``n * word`` bytes;
* ``BITMASK`` one bit per element + the changed values:      ``n / 8 + f n word`` (best for 1/16 < f < 7/8 in bf16);
* ``INDICES`` gap-coded positions (1, 2 or 4 bytes each) + the changed values: ``~ f n (w + word)`` (best for small f).

``encode`` picks the smallest (``encoded_sizes`` / ``choose``: the pure rule, ties to the simpler form), always
plus a 48-byte header. Everything is exact: elements are compared as integer bit patterns, so -0.0 vs 0.0 and NaN
payloads are changes like any other, and applying a delta reproduces the new bits exactly.

Format (little-endian; sections start at 8-byte offsets)::

    header  "TD" fmt kind word gapw pad2 | n (i64) | count (i64) | base (u64) | target (u64) | nbytes (u64)
    meta    BITMASK: ceil(n/8) bytes, bit i of byte j = element 8j+i changed
            INDICES: count gaps of gapw bytes (unsigned): position_0 = gap_0, position_i = position_{i-1} + gap_i
    values  count elements of ``word`` bytes (FULL: all n)

Gap coding: a gap larger than the width allows (255 for 1 byte, 65535 for 2) is split by *fillers*: extra positions
every ``2**(8 gapw) - 1`` elements inside the gap, whose values are the new (= old, unchanged) values, so writing
them is a no-op. That keeps one fixed gap width per bucket, decoding one cumsum, and the cost of a few rare long gaps
a few extra entries; ``count`` includes the fillers. The width with the fewest bytes is chosen per bucket.


``base`` and ``target`` are the checksums (checksums.py) of the previous and the new values: a receiver whose
destination does not hold the base refuses before writing anything, and with ``verify`` it checks the result.

Where the time goes (the native kernels)
----------------------------------------
A delta push is bound by the CPU where a full push is bound by the wire, so on CPU tensors the work is done by one
pass of C (codec/delta/native.c, loaded by codec/delta/native.py): ``td_scan`` compares the cached and the new bytes as
64-bit words and, for the few that differ, emits the changed elements' positions and values, the checksum change
and the filler counts of every gap width, and writes the changed words into the cache (``update_prev``: the cache
advances in the same pass); ``td_sums`` is the receiver's base checksum in one read; ``td_change`` / ``td_scatter``
check and write the changes. The torch path (CUDA tensors, ``TRAINER_SYNC_NATIVE=0``, no C compiler) gives the same
bytes; the tests run both. Measured on this 2-core box (64 MiB bf16 bucket, 1.5 % changed): encode 28 ms native vs
~600 ms torch, apply ~25 ms.

Where the rest lives: checksums.py (the checksum, ``Sums``), decode.py (applying a buffer in place), cache.py (the
trainer's last pushed bytes); the delta codec of the push pipeline (codec/delta/codec.py) encodes a bucket with
``encode`` against the cache and applies it with ``apply_segments``; plan/delta_policy.py decides when a push may go
as deltas.
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

import torch

from . import native
from .checksums import WORD_DTYPE, DeltaError, Sums, checksum_parts, delta_parts, incremental_pays, sums, words

FULL, BITMASK, INDICES = 0, 1, 2
KIND_NAMES = {FULL: "full", BITMASK: "bitmask", INDICES: "indices"}
GAP_WIDTHS = (1, 2, 4)
MAGIC = b"TD"
FORMAT = 1
_HEADER = struct.Struct("<2sBBBBxxqqQQQ")
HEADER_BYTES = 48  # _HEADER.size (40) padded to a multiple of 8

assert _HEADER.size <= HEADER_BYTES
if sys.byteorder != "little":  # the gap bytes are cut out of int32 words
    raise ImportError("trainer_sync.codec.delta.format assumes a little-endian machine")



def pad8(n: int) -> int:
    return (n + 7) & ~7


def max_gap(width: int) -> int:
    """The largest gap a gap of ``width`` bytes holds (4 bytes: int32, signed)."""
    return 2 ** 31 - 1 if width == 4 else 2 ** (8 * width) - 1


@dataclass(frozen=True)
class Header:
    kind: int
    word: int
    gap_width: int
    n: int  # elements of ``word`` bytes in the bucket
    count: int  # values carried (FULL: n; INDICES: changed + fillers)
    base: int  # checksum of the previous values
    target: int  # checksum of the new values
    nbytes: int  # the whole encoded buffer, header included

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]

    def pack(self) -> bytes:
        raw = _HEADER.pack(MAGIC, FORMAT, self.kind, self.word, self.gap_width, self.n, self.count, self.base,
                           self.target, self.nbytes)
        return raw + bytes(HEADER_BYTES - len(raw))

    @classmethod
    def unpack(cls, buf: torch.Tensor | bytes) -> "Header":
        raw = bytes(buf[:HEADER_BYTES].cpu().numpy().tobytes()) if isinstance(buf, torch.Tensor) else bytes(buf)
        if len(raw) < HEADER_BYTES:
            raise DeltaError(f"delta buffer too short for its header ({len(raw)} < {HEADER_BYTES} bytes)")
        magic, fmt, kind, word, gapw, n, count, base, target, nbytes = _HEADER.unpack(raw[:_HEADER.size])
        if magic != MAGIC or fmt != FORMAT or kind not in KIND_NAMES or word not in WORD_DTYPE:
            raise DeltaError(f"not a trainer_sync delta buffer (magic {magic!r}, format {fmt}, kind {kind})")
        return cls(kind, word, gapw, n, count, base, target, nbytes)


# ------------------------------------------------------------------------------------------------ pure rule


def encoded_sizes(n: int, changed: int, word: int, fillers: dict[int, int] | None = None) -> dict[tuple[int, int], int]:
    """Bytes of each encoding of a bucket of ``n`` elements of ``word`` bytes with ``changed`` changed elements,
    header included. Keys: ``(FULL, 0)``, ``(BITMASK, 0)``, ``(INDICES, gap_width)``; ``fillers[w]`` is the number
    of filler entries gap width ``w`` needs (0 where not given)."""
    fillers = fillers or {}
    sizes = {(FULL, 0): HEADER_BYTES + n * word,
             (BITMASK, 0): HEADER_BYTES + pad8(-(-n // 8)) + changed * word}
    for w in GAP_WIDTHS:
        count = changed + fillers.get(w, 0)
        sizes[(INDICES, w)] = HEADER_BYTES + pad8(count * w) + count * word
    return sizes


def choose(sizes: dict[tuple[int, int], int]) -> tuple[int, int]:
    """The smallest encoding; ties go to the simpler one (full, then bitmask, then narrower gaps)."""
    return min(sizes, key=lambda k: (sizes[k], k))


def default_word(t: torch.Tensor) -> int:
    """2 bytes (bf16/fp16 elements; also exact for fp32) when the byte count allows, else 1."""
    nbytes = t.numel() * t.element_size()
    return 2 if nbytes % 2 == 0 else 1



def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask
    bits = padded.view(-1, 8)
    out = bits[:, 0].clone()
    for i in range(1, 8):
        out |= bits[:, i] << i
    return out


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].bool()


_CHUNK = 1 << 24


def _changed_positions(a: torch.Tensor, b: torch.Tensor, word: int) -> torch.Tensor:
    """Sorted int64 positions of the ``word``-byte words where ``a`` and ``b`` differ.

    Compares 64-bit words first (a quarter of the comparisons of bf16 elements, and ``nonzero`` over a mask that is
    mostly False), then refines only the changed 64-bit words to elements (a chunk where over a quarter of the
    64-bit words changed takes the element compare instead). Falls back to the element compare when the bytes are
    not a whole number of 64-bit words. In chunks, so the transient masks stay bounded."""
    per = 8 // word if word < 8 else 1
    nbytes = b.numel() * word
    if word >= 8 or nbytes % 8 or b.numel() == 0:
        return torch.nonzero(a != b).view(-1)
    a64, b64 = a.view(torch.uint8).view(torch.int64), b.view(torch.uint8).view(torch.int64)
    out = []
    for lo in range(0, a64.numel(), _CHUNK):
        m64 = a64[lo:lo + _CHUNK] != b64[lo:lo + _CHUNK]
        k = int(torch.count_nonzero(m64))
        if not k:
            continue
        if k * 4 > m64.numel():  # dense: most 64-bit words changed, the element compare is cheaper
            e = lo * per
            out.append(torch.nonzero(a[e:e + m64.numel() * per] != b[e:e + m64.numel() * per]).view(-1).add_(e))
            continue
        q = torch.nonzero(m64).view(-1)
        q += lo
        x = torch.index_select(a64, 0, q) ^ torch.index_select(b64, 0, q)  # the changed 64-bit words' bit flips
        lane = torch.nonzero(x.view(WORD_DTYPE[word]) != 0).view(-1)  # (word index within q) * per + lane
        out.append(torch.index_select(q, 0, lane // per).mul_(per).add_(lane % per))
    if not out:
        return torch.zeros(0, dtype=torch.int64, device=b.device)
    return out[0] if len(out) == 1 else torch.cat(out)


def _gaps(pos: torch.Tensor) -> torch.Tensor:
    """Gaps between sorted positions (the first one from 0)."""
    return torch.diff(pos, prepend=pos.new_zeros(1))


def _fillers(gaps: torch.Tensor, width: int) -> torch.Tensor:
    """Filler entries each gap needs at ``width`` bytes a gap."""
    return (gaps - 1).clamp_(min=0) // max_gap(width)


def _filler_counts(gaps: torch.Tensor, n: int) -> dict[int, int]:
    """Filler entries in all, per gap width (one synchronization; only gaps above 255 are divided)."""
    if not gaps.numel():
        return {w: 0 for w in GAP_WIDTHS}
    long = gaps[gaps > max_gap(1)]
    widths = [w for w in GAP_WIDTHS if n - 1 > max_gap(w)]  # a gap can exceed this width at all
    counts = torch.stack([((long - 1) // max_gap(w)).sum() for w in widths]).tolist() if widths else []
    out = {w: 0 for w in GAP_WIDTHS}
    out.update(zip(widths, (int(c) for c in counts)))
    return out


def _with_fillers(gaps: torch.Tensor, width: int) -> torch.Tensor:
    """Gaps with every one above ``max_gap(width)`` split into max-size gaps (fillers) and a remainder."""
    m = max_gap(width)
    f = _fillers(gaps, width)
    total = int(f.sum())
    if total == 0:
        return gaps
    ends = torch.cumsum(f + 1, 0) - 1
    out = torch.full((gaps.numel() + total,), m, dtype=gaps.dtype, device=gaps.device)
    out[ends] = gaps - f * m
    return out


def _gap_bytes(gaps: torch.Tensor, width: int) -> torch.Tensor:
    return gaps.to(torch.int32).view(torch.uint8).view(-1, 4)[:, :width].reshape(-1)


def gaps_from_bytes(raw: torch.Tensor, count: int, width: int) -> torch.Tensor:
    full = torch.zeros(count, 4, dtype=torch.uint8, device=raw.device)
    full[:, :width] = raw[:count * width].view(count, width)
    return full.view(torch.int32).view(-1).to(torch.int64)


# ------------------------------------------------------------------------------------------------ encode / decode


@dataclass(frozen=True)
class DeltaStats:
    n: int
    changed: int
    word: int
    kind: int
    gap_width: int
    nbytes: int  # the encoded buffer's size
    full_nbytes: int  # n * word (what a raw full push carries, no header)
    target: Sums | None = None  # the new values' checksum sums (the next push's base)
    prev_updated: bool = False  # ``encode(update_prev=True)`` wrote the changed words into ``prev``: prev == new

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.n if self.n else 0.0


def _choose_allowed(n: int, changed: int, word: int, kinds, widths, fillers) -> tuple[tuple[int, int], int]:
    """The encoding to use and its size; ``fillers``: a callable giving the filler counts per width (only called
    when INDICES can win)."""
    sizes = encoded_sizes(n, changed, word)
    others = [v for k, v in sizes.items() if k[0] in kinds and k[0] != INDICES]
    if INDICES in kinds and (not others or min(sizes[(INDICES, w)] for w in widths) < min(others)):
        sizes = encoded_sizes(n, changed, word, fillers())  # indices may win: count the fillers per width
    elif INDICES in kinds:
        sizes = {k: v for k, v in sizes.items() if k[0] != INDICES}  # cannot win: not counted
    allowed = {k: v for k, v in sizes.items() if k[0] in kinds and (k[0] != INDICES or k[1] in widths)}
    if not allowed:
        raise DeltaError(f"delta: no encoding allowed (kinds={kinds})")
    choice = choose(allowed)
    return choice, allowed[choice]


def _put_header(out: torch.Tensor, h: Header) -> None:
    out[:HEADER_BYTES] = torch.frombuffer(bytearray(h.pack()), dtype=torch.uint8).to(out.device)


def encode(prev: torch.Tensor, new: torch.Tensor, *, word: int | None = None, kinds=(FULL, BITMASK, INDICES),
           widths=GAP_WIDTHS, base: Sums | None = None, update_prev: bool = False) -> tuple[torch.Tensor, DeltaStats]:
    """Encode ``new`` against ``prev`` (same shape/bytes, any dtype, CPU or CUDA): the smallest allowed encoding as a
    flat uint8 tensor on ``new``'s device, and its stats (``stats.target``: the new values' checksum sums, which the
    sender keeps as the next push's ``base``). ``kinds``/``widths`` restrict the choice (tests, or a receiver that
    takes only full buckets). ``base``: the previous values' sums if known (else one pass over ``prev``); the new
    sums follow from them and the changes alone, so a sender that keeps them reads each bucket's bytes only to
    compare them. ``update_prev``: ``prev`` may be overwritten with ``new`` on the way (the sender's cache
    advancing without a second pass); ``stats.prev_updated`` says whether it was.

    Contiguous CPU tensors go through the native one-pass scan (codec/delta/native.c), others through torch; both
    give the same bytes."""
    if word is None:
        word = default_word(new)
    a, b = words(prev, word), words(new, word)
    if a.numel() != b.numel():
        raise DeltaError(f"delta: previous and new values differ in size ({a.numel()} vs {b.numel()} words)")
    if native.available(a, b):
        return _encode_native(a, b, word, kinds, widths, base, update_prev)
    if a.device != b.device:
        a = a.to(b.device)
    n = b.numel()
    pos = _changed_positions(a, b, word)  # sorted int64 positions of the changed words
    changed = pos.numel()
    if base is None:
        base = Sums(checksum_parts(a).tolist())
    memo = {}

    def fillers() -> dict[int, int]:  # only when indices may win (their lower bound beats the others)
        memo["gaps"] = _gaps(pos)
        return _filler_counts(memo["gaps"], n)

    (kind, width), nbytes = _choose_allowed(n, changed, word, kinds, widths, fillers)
    out = torch.empty(nbytes, dtype=torch.uint8, device=b.device)
    body = HEADER_BYTES

    def target_sums(vals: torch.Tensor) -> Sums:
        if not changed:
            return base
        if incremental_pays(changed, n):
            return base.plus(delta_parts(pos, a[pos], vals, word).tolist())
        return sums(b)

    if kind == FULL:
        count = n
        out[body:].view(WORD_DTYPE[word]).copy_(b)
        target = sums(b) if changed else base
    elif kind == BITMASK:
        count = changed
        mask = torch.zeros(n, dtype=torch.bool, device=b.device)
        mask[pos] = True
        packed = _pack_bits(mask)
        out[body:body + packed.numel()] = packed
        vals_at = body + pad8(packed.numel())
        out[body + packed.numel():vals_at].zero_()  # padding: zeros, so both encoders give the same bytes
        vals = out[vals_at:].view(WORD_DTYPE[word])
        torch.index_select(b, 0, pos, out=vals)
        target = target_sums(vals)
    else:
        g = _with_fillers(memo["gaps"], width)
        count = g.numel()
        out[body:body + count * width] = _gap_bytes(g, width)
        positions = torch.cumsum(g, 0) if count != changed else pos
        vals_at = body + pad8(count * width)
        out[body + count * width:vals_at].zero_()
        vals = out[vals_at:].view(WORD_DTYPE[word])
        torch.index_select(b, 0, positions, out=vals)
        target = target_sums(b[pos] if count != changed else vals)
    _put_header(out, Header(kind, word, width, n, count, base.mixed, target.mixed, nbytes))
    return out, DeltaStats(n, changed, word, kind, width, nbytes, n * word, target)


def _encode_native(a: torch.Tensor, b: torch.Tensor, word: int, kinds, widths, base: Sums | None,
                   update_prev: bool) -> tuple[torch.Tensor, DeltaStats]:
    """``encode`` through the native kernels: one pass gives the changed positions and values, the checksum change
    and the filler counts; the chosen body is then written from those (O(changed)), FULL copied."""
    n = b.numel()
    ra, rb = a.view(torch.uint8), b.view(torch.uint8)
    if base is None:
        base = Sums(native.sums(ra))  # before the scan: it may overwrite prev
    pos, vals, parts, fill = native.scan(ra, rb, word, update_prev)
    changed = pos.numel()
    target = base.plus(parts)
    (kind, width), nbytes = _choose_allowed(n, changed, word, kinds, widths, lambda: fill)
    out = torch.empty(nbytes, dtype=torch.uint8)
    body = HEADER_BYTES
    if kind == FULL:
        count = n
        out[body:].copy_(rb)
    elif kind == BITMASK:
        count = changed
        nb = -(-n // 8)
        out[body:body + pad8(nb)].zero_()
        native.setbits(pos, out[body:])
        out[body + pad8(nb):].copy_(vals)
    else:
        count = changed + fill[width]
        vals_at = body + pad8(count * width)
        out[body + count * width:vals_at].zero_()
        got = native.indices(pos, vals, rb, word, width, out[body:], out[vals_at:])
        if got != count:  # cannot happen unless the scan and the gap writer disagree
            raise DeltaError(f"delta: native encoder wrote {got} entries, counted {count}")
    _put_header(out, Header(kind, word, width, n, count, base.mixed, target.mixed, nbytes))
    return out, DeltaStats(n, changed, word, kind, width, nbytes, n * word, target, prev_updated=update_prev)


