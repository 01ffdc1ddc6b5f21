"""The native delta kernels (trainer_sync/codec/delta/native.c) against delta.py's torch path: the same encoded bytes
for every encoding, word size, gap width and fraction, the cache entry advanced in place by the scan, the checksum
of segments at any offset, and a corrupt buffer refused before the native apply writes anything."""
import pytest
import torch

from trainer_sync.codec import delta as D
from trainer_sync.codec.delta import native

pytestmark = pytest.mark.skipif(not native.enabled(), reason="the native delta kernels did not build on this host")


def both(monkeypatch, fn):
    """fn() through the torch path, then through the native kernels."""
    monkeypatch.setenv("TRAINER_SYNC_NATIVE", "0")
    slow = fn()
    monkeypatch.setenv("TRAINER_SYNC_NATIVE", "1")
    return slow, fn()


def changed(prev: torch.Tensor, positions) -> torch.Tensor:
    new = prev.clone()
    flat = new.view(-1)
    idx = torch.as_tensor(positions, dtype=torch.int64)
    flat[idx] = (flat[idx].float() * 1.5 + 0.25).to(prev.dtype)
    return new


@pytest.mark.parametrize("n", [1, 7, 8, 1000, 4099, 100_003])
@pytest.mark.parametrize("frac", [0.0, 0.001, 0.02, 0.2, 0.7, 1.0])
@pytest.mark.parametrize("dtype,word", [(torch.bfloat16, 2), (torch.bfloat16, 1), (torch.float32, 4),
                                        (torch.float64, 8)])
def test_same_bytes_as_torch(monkeypatch, n, frac, dtype, word):
    g = torch.Generator().manual_seed(n)
    prev = torch.randn(n, generator=g).to(dtype)
    new = changed(prev, torch.nonzero(torch.rand(n, generator=g) < frac).view(-1))
    for kinds in [(D.FULL, D.BITMASK, D.INDICES), (D.BITMASK,), (D.INDICES,)]:
        (a, sa), (b, sb) = both(monkeypatch, lambda: D.encode(prev, new, word=word, kinds=kinds))
        assert torch.equal(a, b), (kinds, sa, sb)
        assert sa.target == sb.target == D.sums(D.words(new, word)) and sa.changed == sb.changed


@pytest.mark.parametrize("width", [1, 2])
def test_fillers_same_bytes(monkeypatch, width):
    # gaps of every length around the widths' limits: fillers carry the unchanged values
    n = 300_000
    prev = torch.randn(n).to(torch.bfloat16)
    new = changed(prev, [0, 255, 256, 511, 512 + 255 * 3, 70_000, 70_000 + 65_535, 70_000 + 2 * 65_536 + 7, n - 1])
    (a, _), (b, sb) = both(monkeypatch, lambda: D.encode(prev, new, kinds=(D.INDICES,), widths=(width,)))
    assert torch.equal(a, b) and sb.gap_width == width
    dest = prev.clone()
    D.decode_into(dest, b)
    assert torch.equal(dest.view(torch.int16), new.view(torch.int16))


def test_dense_scan_grows_its_buffers():
    # more changes than the first capacity (n / 64): the scan resumes where it stopped, nothing lost or repeated
    n = 1 << 20
    prev = torch.randn(n).to(torch.bfloat16)
    new = changed(prev, torch.arange(0, n, 3))
    pos, vals, parts, _ = native.scan(prev.view(torch.uint8), new.view(torch.uint8), 2, False)
    want = torch.nonzero(prev.view(torch.int16) != new.view(torch.int16)).view(-1)
    assert torch.equal(pos, want) and torch.equal(vals.view(torch.int16), new.view(torch.int16)[want])
    assert D.Sums(native.sums(prev.view(torch.uint8))).plus(parts) == D.sums(new)


def test_scan_advances_the_cache_in_place():
    prev = torch.randn(10_001).to(torch.bfloat16)
    new = changed(prev, [3, 4, 5000, 10_000])
    cache = prev.clone()
    base = D.sums(cache)
    buf, st = D.encode(cache, new, base=base, update_prev=True)
    assert st.prev_updated and torch.equal(cache.view(torch.int16), new.view(torch.int16))
    assert st.target == D.sums(cache)
    dest = prev.clone()
    D.decode_into(dest, buf)
    assert torch.equal(dest.view(torch.int16), new.view(torch.int16))


@pytest.mark.parametrize("start", [0, 1, 1023, 1024, 5000])
@pytest.mark.parametrize("nbytes", [0, 5, 8, 8 * 1024 + 3, 70_001])
def test_sums_at_any_offset(start, nbytes):
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    want = D.Sums(D.checksum_parts(raw, 8 * start).tolist())
    assert D.Sums(native.sums(raw, start)) == want


def test_corrupt_gap_refused_before_writing():
    prev = torch.randn(50_000).to(torch.bfloat16)
    new = changed(prev, list(range(0, 50_000, 97)))
    buf, st = D.encode(prev, new)
    assert st.kind == D.INDICES
    for at in (D.HEADER_BYTES + 1, buf.numel() - 1):  # a gap, a value
        bad = buf.clone()
        bad[at] ^= 0x40
        dest = prev.clone()
        with pytest.raises(D.DeltaError):
            D.apply_segments([(0, dest[:30_000]), (30_000, dest[30_000:])], bad)
        assert torch.equal(dest.view(torch.int16), prev.view(torch.int16)), "a corrupt delta wrote something"


@pytest.mark.parametrize("kinds", [(D.INDICES,), (D.BITMASK,)])
def test_corrupt_count_refused_before_any_read(kinds):
    # a header whose count does not match its bytes would send the kernels past the buffer: refused up front
    prev = torch.randn(20_000).to(torch.bfloat16)
    new = changed(prev, list(range(0, 20_000, 50)))
    buf, _ = D.encode(prev, new, kinds=kinds)
    h = D.Header.unpack(buf)
    for count in (h.count * 1000, h.count + 1, -1):
        bad = buf.clone()
        bad[:D.HEADER_BYTES] = torch.frombuffer(bytearray(D.Header(h.kind, h.word, h.gap_width, h.n, count, h.base,
                                                                   h.target, h.nbytes).pack()), dtype=torch.uint8)
        dest = prev.clone()
        with pytest.raises(D.DeltaError, match="corrupt"):
            D.decode_into(dest, bad)
        assert torch.equal(dest.view(torch.int16), prev.view(torch.int16))
