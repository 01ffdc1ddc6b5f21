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

``base`` and ``target`` are position-weighted checksums (``checksum``) of the previous and the new values: a
receiver whose destination does not hold the base refuses (``DeltaBaseMismatch``) before writing anything, so a
receiver that is not at the base version can never apply a wrong delta, and with ``verify`` it checks the result.
The checksum is three wrapping int64 sums over the bytes read as 64-bit words (plain, weighted by 8 KiB row and by
column; ``Sums``), so the new sums follow from the old ones and the changed words alone: a sender that keeps each
bucket's sums (``DeltaStats.target``) never re-reads a sparse bucket to checksum it, and a receiver checks a sparse
delta's result before writing anything.

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

The wiring (phase 2: delta_policy.py, delta_send.py, delta_recv.py)
-------------------------------------------------------------------
*Trainer-side cache* (``DeltaCache`` below, in delta_send.DeltaSender): each trainer rank keeps the last pushed
wire bytes of its own buckets (its shard only, in the wire dtype), keyed by bucket index for one plan (a new plan
clears it), on the device of its pack buffers, capped by ``SyncConfig.delta_cache_mb`` (buckets past the cap go
FULL). A delta bucket advances its entry in place (only the changed words); entries become the base of a version
only once every receiver acknowledged it (``commit``), a failed push drops what it overwrote (``abandon``).

*Which encoding, which base* (delta_policy.delta_allowed, pure): trainer rank 0 allows deltas against its last
acknowledged version ``b`` only when every receiver said (when it joined, then with every acknowledgement) that it
holds ``b`` of the same plan in a destination it can apply deltas to; else the push goes full and
``SyncReport.full_reason`` says why. Each sender then picks FULL/BITMASK/INDICES per bucket; each bucket travels as
the 48-byte header broadcast and then its body. CUDA IPC pushes always go full.

*Receivers* (delta_recv.py) apply into the served tensors themselves (``Receiver(..., targets=...)``) or into a
mirror of the last version (whole tensors for engines that re-process layers, e.g. vLLM's layerwise reload). A
delta whose base checksum does not match is refused before writing; after the transfer every member learns who
refused (the verdict round) and the same push is sent again full at once. Catch-up (catchup.py) serves full
versions. *Report*: ``bytes_sent``, ``bytes_full``, ``changed_fraction`` (over the delta-encoded buckets).
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

import torch

from . import native

FULL, BITMASK, INDICES = 0, 1, 2
KIND_NAMES = {FULL: "full", BITMASK: "bitmask", INDICES: "indices"}
GAP_WIDTHS = (1, 2, 4)
MAGIC = b"TD"
FORMAT = 1
_HEADER = struct.Struct("<2sBBBBxxqqQQQ")
HEADER_BYTES = 48  # _HEADER.size (40) padded to a multiple of 8
_WORD_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MASK64 = (1 << 64) - 1
_ROW = 1024  # checksum row length (64-bit words)
_MIX = 0x9E3779B97F4A7C15
_MIX2 = 0xC2B2AE3D27D4EB4F

assert _HEADER.size <= HEADER_BYTES
if sys.byteorder != "little":  # the gap bytes are cut out of int32 words
    raise ImportError("trainer_sync.codec.delta.format assumes a little-endian machine")


class DeltaError(ValueError):
    """A delta that cannot be applied (malformed, or not for this destination)."""


class DeltaBaseMismatch(DeltaError):
    """The destination does not hold the values the delta was computed against (the receiver is not at the base
    version): nothing was written; the receiver needs a full push."""


def _pad8(n: int) -> int:
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
        if magic != MAGIC or fmt != FORMAT or kind not in KIND_NAMES or word not in _WORD_DTYPE:
            raise DeltaError(f"not a trainer_sync delta buffer (magic {magic!r}, format {fmt}, kind {kind})")
        return cls(kind, word, gapw, n, count, base, target, nbytes)


# ------------------------------------------------------------------------------------------------ pure rule


def encoded_sizes(n: int, changed: int, word: int, fillers: dict[int, int] | None = None) -> dict[tuple[int, int], int]:
    """Bytes of each encoding of a bucket of ``n`` elements of ``word`` bytes with ``changed`` changed elements,
    header included. Keys: ``(FULL, 0)``, ``(BITMASK, 0)``, ``(INDICES, gap_width)``; ``fillers[w]`` is the number
    of filler entries gap width ``w`` needs (0 where not given)."""
    fillers = fillers or {}
    sizes = {(FULL, 0): HEADER_BYTES + n * word,
             (BITMASK, 0): HEADER_BYTES + _pad8(-(-n // 8)) + changed * word}
    for w in GAP_WIDTHS:
        count = changed + fillers.get(w, 0)
        sizes[(INDICES, w)] = HEADER_BYTES + _pad8(count * w) + count * word
    return sizes


def choose(sizes: dict[tuple[int, int], int]) -> tuple[int, int]:
    """The smallest encoding; ties go to the simpler one (full, then bitmask, then narrower gaps)."""
    return min(sizes, key=lambda k: (sizes[k], k))


# ------------------------------------------------------------------------------------------------ helpers


def words(t: torch.Tensor, word: int | None = None) -> torch.Tensor:
    """A flat integer view (``word`` bytes per element) of a contiguous tensor's bits; no copy."""
    if not t.is_contiguous():
        raise DeltaError("delta: tensors must be contiguous (they are viewed as raw words in place)")
    flat = t.reshape(-1)
    if word is None:
        word = flat.element_size()
    if flat.element_size() == word and flat.dtype == _WORD_DTYPE[word]:
        return flat
    raw = flat.view(torch.uint8)
    if raw.numel() % word:
        raise DeltaError(f"delta: {raw.numel()} bytes are not a whole number of {word}-byte words")
    return raw.view(_WORD_DTYPE[word])


def default_word(t: torch.Tensor) -> int:
    """2 bytes (bf16/fp16 elements; also exact for fp32) when the byte count allows, else 1."""
    nbytes = t.numel() * t.element_size()
    return 2 if nbytes % 2 == 0 else 1


def _checksum_parts(w: torch.Tensor, offset: int = 0) -> torch.Tensor:
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
    n, R, start = q.numel(), _ROW, offset // 8
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
    return _segments_sums([(0, words(t))])


def _delta_parts(pos: torch.Tensor, old: torch.Tensor, new: torch.Tensor, word: int) -> torch.Tensor:
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
    col = (q & (_ROW - 1)) + 1
    return torch.stack([d.sum(), (d * row).sum(), (d * col).sum()])


def _incremental(changed: int, n: int) -> bool:
    """Whether updating the sums from the changes beats a pass over all words (measured on CPU: ~30 ns per changed
    word against ~0.6 ns per word of a bf16 bucket for the full pass)."""
    return changed * 48 < n


def checksum(t: torch.Tensor, word: int | None = None) -> int:
    """A position-weighted 64-bit checksum of a tensor's bytes: the wrapping sum of its little-endian 64-bit words
    mixed with the sum of each 8 KiB row's sum times the row number, so changed, swapped or shifted values are all
    seen. (``word`` is accepted for symmetry; the checksum depends on the bytes only.)"""
    return sums(words(t, word)).mixed


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask
    bits = padded.view(-1, 8)
    out = bits[:, 0].clone()
    for i in range(1, 8):
        out |= bits[:, i] << i
    return out


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
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
        lane = torch.nonzero(x.view(_WORD_DTYPE[word]) != 0).view(-1)  # (word index within q) * per + lane
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


def _gaps_from_bytes(raw: torch.Tensor, count: int, width: int) -> torch.Tensor:
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
        base = Sums(_checksum_parts(a).tolist())
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
        if _incremental(changed, n):
            return base.plus(_delta_parts(pos, a[pos], vals, word).tolist())
        return sums(b)

    if kind == FULL:
        count = n
        out[body:].view(_WORD_DTYPE[word]).copy_(b)
        target = sums(b) if changed else base
    elif kind == BITMASK:
        count = changed
        mask = torch.zeros(n, dtype=torch.bool, device=b.device)
        mask[pos] = True
        packed = _pack_bits(mask)
        out[body:body + packed.numel()] = packed
        vals_at = body + _pad8(packed.numel())
        out[body + packed.numel():vals_at].zero_()  # padding: zeros, so both encoders give the same bytes
        vals = out[vals_at:].view(_WORD_DTYPE[word])
        torch.index_select(b, 0, pos, out=vals)
        target = target_sums(vals)
    else:
        g = _with_fillers(memo["gaps"], width)
        count = g.numel()
        out[body:body + count * width] = _gap_bytes(g, width)
        positions = torch.cumsum(g, 0) if count != changed else pos
        vals_at = body + _pad8(count * width)
        out[body + count * width:vals_at].zero_()
        vals = out[vals_at:].view(_WORD_DTYPE[word])
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
        out[body:body + _pad8(nb)].zero_()
        native.setbits(pos, out[body:])
        out[body + _pad8(nb):].copy_(vals)
    else:
        count = changed + fill[width]
        vals_at = body + _pad8(count * width)
        out[body + count * width:vals_at].zero_()
        got = native.indices(pos, vals, rb, word, width, out[body:], out[vals_at:])
        if got != count:  # cannot happen unless the scan and the gap writer disagree
            raise DeltaError(f"delta: native encoder wrote {got} entries, counted {count}")
    _put_header(out, Header(kind, word, width, n, count, base.mixed, target.mixed, nbytes))
    return out, DeltaStats(n, changed, word, kind, width, nbytes, n * word, target, prev_updated=update_prev)


def _values(buf: torch.Tensor, h: Header) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(positions int64, sorted, or None for FULL; values) of an encoded buffer. On CPU the positions come from the
    native kernels (a running sum of unsigned gaps, or the set bits), else from torch."""
    dt = _WORD_DTYPE[h.word]
    body = HEADER_BYTES
    if h.kind == FULL:
        return None, buf[body:body + h.n * h.word].view(dt)
    fast = native.available(buf)
    if h.kind == BITMASK:
        nb = -(-h.n // 8)
        at = body + _pad8(nb)
        vals = buf[at:at + h.count * h.word].view(dt)
        if fast:
            pos = native.bits(buf[body:body + nb], h.n, h.count)
            if pos is None:
                raise DeltaError(f"delta: the bitmask sets more than its {h.count} values (corrupt buffer)")
        else:
            pos = torch.nonzero(_unpack_bits(buf[body:body + nb], h.n)).view(-1)
        return pos, vals
    if h.gap_width not in GAP_WIDTHS:
        raise DeltaError(f"delta: gap width {h.gap_width} is not one of {GAP_WIDTHS}")
    at = body + _pad8(h.count * h.gap_width)
    if fast:
        pos, _ = native.positions(buf[body:], h.count, h.gap_width)
    else:
        pos = torch.cumsum(_gaps_from_bytes(buf[body:], h.count, h.gap_width), 0)
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
        want = HEADER_BYTES + _pad8(-(-h.n // 8)) + h.count * h.word
    else:
        want = HEADER_BYTES + _pad8(h.count * h.gap_width) + h.count * h.word
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
            d = _delta_parts(p, v[(p - off).to(v.device)].to(pos.device), vals[a:z], word).tolist()
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
    base = base if base is not None else _segments_sums(views)
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


def _segments_sums(views: list[tuple[int, torch.Tensor]]) -> Sums:
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
    return Sums(torch.stack([_checksum_parts(v, off * v.element_size()).to(device)
                             for off, v in views]).sum(0).tolist())


def segments_sums(segments: list[tuple[int, torch.Tensor]]) -> Sums:
    """The checksum sums of a bucket holding these ``(byte_offset, tensor)`` segments and zeros elsewhere (the
    checksum depends on the bytes only: no word size needed)."""
    return _segments_sums([(off, words(t, 1)) for off, t in segments])


def segments_checksum(views: list[tuple[int, torch.Tensor]]) -> int:
    """The checksum of a bucket holding these ``(word_offset, words)`` segments and zeros elsewhere."""
    return _segments_sums(views).mixed


# ------------------------------------------------------------------------------------------------ trainer-side cache


@dataclass
class _Entry:
    data: torch.Tensor  # the wire bytes last pushed for this bucket
    sums: Sums
    version: int | None  # None: overwritten by a push not yet acknowledged


class DeltaCache:
    """The trainer's last pushed wire bytes of its own buckets: the base of the next push's deltas (phase 2).

    One copy of this rank's buckets in the wire dtype, on ``device``, admitted in the order buckets are first seen
    until ``cap_bytes`` (None: no cap); a bucket past the cap is never cached and always travels full. A push
    overwrites each entry as it packs (no second copy): ``commit(version)`` after every receiver acknowledged makes
    them the base of ``version``; ``abandon()`` after a failure drops the entries that push overwrote (their bytes
    belong to no acknowledged version), so those buckets go full next time. ``clear()`` when the plan changes."""

    def __init__(self, cap_bytes: int | None = None, device: torch.device | str | None = None):
        self.cap_bytes = cap_bytes
        self.device = torch.device(device) if device is not None else None
        self.entries: dict[object, _Entry] = {}
        self.refused: set = set()  # keys past the cap

    @property
    def nbytes(self) -> int:
        return sum(e.data.numel() for e in self.entries.values())

    def base(self, key, nbytes: int, version: int) -> tuple[torch.Tensor, Sums] | None:
        """The cached bytes and sums of bucket ``key`` if they are exactly version ``version`` and ``nbytes`` long."""
        e = self.entries.get(key)
        if e is None or e.version != version or e.data.numel() != nbytes:
            return None
        return e.data, e.sums

    def store(self, key, data: torch.Tensor, sums_: Sums | None = None) -> bool:
        """Keep ``data`` (flat bytes of any dtype, copied) as bucket ``key``'s newest, not yet acknowledged bytes;
        False when the cap leaves no room for it."""
        raw = data.reshape(-1).view(torch.uint8)
        e = self.entries.get(key)
        if e is None or e.data.numel() != raw.numel():
            if key in self.refused:
                return False
            have = self.nbytes - (e.data.numel() if e is not None else 0)
            if self.cap_bytes is not None and have + raw.numel() > self.cap_bytes:
                self.entries.pop(key, None)
                self.refused.add(key)
                return False
            e = _Entry(torch.empty(raw.numel(), dtype=torch.uint8, device=self.device or raw.device), Sums((0, 0, 0)),
                       None)
            self.entries[key] = e
        e.data.copy_(raw, non_blocking=False)
        e.sums = sums_ if sums_ is not None else sums(e.data)
        e.version = None
        return True

    def overwriting(self, key) -> None:
        """Bucket ``key``'s entry is about to be overwritten in place by this push: it holds no acknowledged
        version from now on (a push failing half way leaves no entry claiming a version it no longer holds)."""
        self.entries[key].version = None

    def commit(self, version: int) -> None:
        for e in self.entries.values():
            if e.version is None:
                e.version = version

    def abandon(self) -> None:
        self.entries = {k: e for k, e in self.entries.items() if e.version is not None}

    def clear(self) -> None:
        self.entries.clear()
        self.refused.clear()
