"""Delta encoding (trainer_sync/delta.py, issue 16 phase 1): pure, no processes.

Round trips of every encoding (full, bitmask, gap-coded indices at every gap width, fillers), empty and total
change, random fractions, odd sizes and word sizes, bit-exactness (-0.0, NaN payloads), the choice rule, and a
destination that is not at the base version refused before anything is written. Every test runs twice: through
the native CPU kernels (codec/delta/native.c) and through the torch path (``TRAINER_SYNC_NATIVE=0``, what CUDA
tensors take); tests/pure/test_delta_native.py checks that both give the same bytes.
"""
import pytest
import torch

from trainer_sync.codec import delta as D
from trainer_sync.codec.delta import format as delta_format, native

ALL = (D.FULL, D.BITMASK, D.INDICES)


@pytest.fixture(autouse=True, params=["native", "torch"])
def path(request, monkeypatch):
    if request.param == "native" and not native.enabled():
        pytest.skip("the native delta kernels did not build on this host")
    monkeypatch.setenv("TRAINER_SYNC_NATIVE", "1" if request.param == "native" else "0")
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def changed_copy(prev: torch.Tensor, frac: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    new = prev.clone()
    m = torch.rand(prev.numel(), generator=g) < frac
    flat = new.view(-1)
    flat[m] = (flat[m].float() + torch.randn(int(m.sum()), generator=g)).to(prev.dtype)
    return new


def roundtrip(prev, new, **kw):
    buf, st = D.encode(prev, new, **kw)
    assert buf.dtype == torch.uint8 and buf.numel() == st.nbytes
    dest = prev.clone()
    h = D.decode_into(dest, buf)
    assert torch.equal(bits(dest), bits(new)), "decoded bits differ"
    assert (h.kind, h.gap_width) == (st.kind, st.gap_width)
    # the exact number of changed words
    w = st.word
    assert st.changed == int((D.words(prev, w) != D.words(new, w)).sum())
    return buf, st


def bf16(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("frac", [0.0, 1e-4, 0.01, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1023, 4097, 100_003])
def test_roundtrip_every_kind(kind, frac, n):
    prev = bf16(n)
    new = changed_copy(prev, frac, seed=n)
    buf, st = roundtrip(prev, new, kinds=(kind,))
    assert st.kind == kind


@pytest.mark.parametrize("width", D.GAP_WIDTHS)
def test_every_gap_width_with_fillers(width):
    n = 300_000
    prev = bf16(n)
    new = prev.clone()
    pos = torch.tensor([0, 1, 255, 256, 512, 70_000, 70_001, 140_000, n - 1])  # gaps above 255 and 65535 too
    new[pos] = (new[pos].float() + 1).to(torch.bfloat16)
    buf, st = roundtrip(prev, new, kinds=(D.INDICES,), widths=(width,))
    h = D.Header.unpack(buf)
    assert st.gap_width == width and st.changed == len(pos)
    gaps = [0, 1, 254, 1, 256, 69_488, 1, 69_999, 159_999]
    expected_fillers = sum(max(g - 1, 0) // D.max_gap(width) for g in gaps)
    assert expected_fillers == {1: 1174, 2: 4, 4: 0}[width]
    assert h.count == len(pos) + expected_fillers


def test_with_fillers_splits_long_gaps():
    gaps = torch.tensor([0, 255, 256, 511, 1000])
    out = delta_format._with_fillers(gaps, 1)
    assert int(out.max()) <= 255 and int(out.min()) >= 0
    assert torch.cumsum(out, 0)[-1] == gaps.sum()
    # every original position is still there
    orig = set(torch.cumsum(gaps, 0).tolist())
    assert orig <= set(torch.cumsum(out, 0).tolist())


def test_empty_change_is_a_header():
    prev = bf16(50_000)
    buf, st = roundtrip(prev, prev.clone())
    assert st.changed == 0 and st.kind == D.INDICES and st.nbytes == D.HEADER_BYTES


def test_all_changed_goes_full():
    prev = bf16(10_000)
    new = (prev.float() * 2 + 1).to(torch.bfloat16)
    new[prev.float() * 2 + 1 == prev.float()] = 3.0  # make sure every element changes
    buf, st = roundtrip(prev, new)
    assert st.changed == prev.numel() and st.kind == D.FULL
    assert st.nbytes == D.HEADER_BYTES + 2 * prev.numel()


@pytest.mark.parametrize("frac,kind", [(0.001, D.INDICES), (0.03, D.INDICES), (0.2, D.BITMASK),
                                       (0.6, D.BITMASK), (0.99, D.FULL)])
def test_auto_choice_is_the_smallest(frac, kind):
    prev = bf16(200_000)
    new = changed_copy(prev, frac)
    buf, st = roundtrip(prev, new)
    assert st.kind == kind
    for k in ALL:  # no forced encoding is smaller
        assert D.encode(prev, new, kinds=(k,))[1].nbytes >= st.nbytes


def test_choice_rule_pure():
    H = D.HEADER_BYTES
    s = D.encoded_sizes(1000, 0, 2)
    assert s[(D.FULL, 0)] == H + 2000 and s[(D.BITMASK, 0)] == H + 128 and s[(D.INDICES, 1)] == H
    assert D.choose(s) == (D.INDICES, 1)
    assert D.choose(D.encoded_sizes(1000, 1000, 2)) == (D.FULL, 0)
    assert D.choose(D.encoded_sizes(1000, 300, 2)) == (D.BITMASK, 0)
    # fillers make a narrow width lose
    s = D.encoded_sizes(10**6, 10, 2, {1: 4000, 2: 10, 4: 0})
    assert D.choose(s) == (D.INDICES, 4)
    # ties go to the simpler form
    assert D.choose({(D.FULL, 0): 100, (D.BITMASK, 0): 100, (D.INDICES, 1): 100}) == (D.FULL, 0)
    assert D.choose({(D.BITMASK, 0): 90, (D.INDICES, 1): 90, (D.INDICES, 2): 90}) == (D.BITMASK, 0)


def test_bit_patterns_not_values():
    prev = torch.tensor([0.0, 1.0, float("nan"), 2.0, float("nan")], dtype=torch.bfloat16)
    new = prev.clone()
    new[0] = -0.0  # equal as floats, different bits
    iv = new.view(torch.int16)
    iv[2] = iv[2] | 1  # another NaN payload
    buf, st = roundtrip(prev, new)
    assert st.changed == 2
    assert D.encode(prev, prev.clone())[1].changed == 0  # the same NaN bits are no change


@pytest.mark.parametrize("dtype,word", [(torch.float32, 2), (torch.float32, 4), (torch.float16, 2),
                                        (torch.uint8, 1), (torch.float64, 8)])
def test_word_sizes_and_dtypes(dtype, word):
    prev = torch.randn(4099).to(dtype) if dtype.is_floating_point else torch.randint(0, 255, (4099,),
                                                                                   dtype=torch.uint8)
    new = prev.clone()
    new[::37] = new[::37] + 1
    roundtrip(prev, new, word=word)


def test_odd_byte_count_uses_one_byte_words():
    prev = torch.randint(0, 255, (1001,), dtype=torch.uint8)  # e.g. an fp8 bucket of odd length
    new = prev.clone()
    new[5] ^= 1
    assert D.default_word(prev) == 1
    buf, st = roundtrip(prev, new)
    assert st.word == 1 and st.changed == 1
    with pytest.raises(D.DeltaError):
        D.encode(prev, new, word=2)


def test_two_d_destination_in_place():
    prev = bf16(64 * 48).view(64, 48)
    new = changed_copy(prev, 0.05)
    buf, _ = D.encode(prev, new)
    dest = prev.clone()
    ptr = dest.data_ptr()
    D.decode_into(dest, buf)
    assert dest.data_ptr() == ptr and torch.equal(bits(dest), bits(new))


@pytest.mark.parametrize("kind", [D.BITMASK, D.INDICES])
def test_wrong_base_is_refused_before_any_write(kind):
    v1 = bf16(20_000)
    v2 = changed_copy(v1, 0.2, seed=2)
    v3 = changed_copy(v2, 0.2, seed=3)
    buf, _ = D.encode(v2, v3, kinds=(kind,))
    for wrong in (v1.clone(), changed_copy(v2, 1e-4, seed=9)):
        before = wrong.clone()
        with pytest.raises(D.DeltaBaseMismatch):
            D.decode_into(wrong, buf)
        assert torch.equal(bits(wrong), bits(before)), "a refused delta wrote something"


def test_checksum_sees_swaps_and_shifts():
    x = bf16(3 * 4096 + 5)
    c = D.checksum(x)
    for i, j in [(0, 4), (0, 1), (3, 4100), (10, 10 + 1024 * 4)]:  # same row, same word, other rows
        y = x.clone()
        y[i], y[j] = x[j], x[i]
        if not torch.equal(bits(x[i:i + 1]), bits(x[j:j + 1])):
            assert D.checksum(y) != c, (i, j)
    assert D.checksum(torch.roll(x, 4)) != c
    assert D.checksum(x.clone()) == c


def test_full_needs_no_base():
    prev = bf16(1000)
    new = changed_copy(prev, 0.3)
    buf, _ = D.encode(prev, new, kinds=(D.FULL,))
    dest = torch.zeros_like(prev)  # any destination: a full bucket carries every value
    D.decode_into(dest, buf)
    assert torch.equal(bits(dest), bits(new))


def test_corrupt_buffers():
    prev = bf16(5000)
    new = changed_copy(prev, 0.01)
    buf, _ = D.encode(prev, new, kinds=(D.INDICES,))
    bad = buf.clone()
    bad[0] = 0
    with pytest.raises(D.DeltaError):
        D.decode_into(prev.clone(), bad)
    with pytest.raises(D.DeltaError):
        D.decode_into(prev.clone(), buf[:-2])  # truncated
    for at in (-1, D.HEADER_BYTES + 3):  # a value flipped, a gap changed: the result would not be the target
        bad = buf.clone()
        bad[at] ^= 0x10
        dest = prev.clone()
        with pytest.raises(D.DeltaError):
            D.decode_into(dest, bad)
        assert torch.equal(bits(dest), bits(prev)), "a corrupt sparse delta wrote something"
    dense, _ = D.encode(prev, changed_copy(prev, 0.3), kinds=(D.BITMASK,))
    dense[-1] ^= 0x10
    with pytest.raises(D.DeltaError):  # many changes: checked before writing too
        D.decode_into(prev.clone(), dense)
    with pytest.raises(D.DeltaError):
        D.decode_into(bf16(5001), buf)  # another size


@pytest.mark.parametrize("frac", [0.0, 0.01, 0.3, 1.0])
def test_segments(frac):
    # A bucket of three tensors at 256-byte offsets with zero padding between them, applied to separate tensors.
    sizes, offs = [1000, 77, 3001], [0, 1024, 1280]  # word offsets (2-byte words): 0, 2048, 2560 bytes
    n = offs[-1] + sizes[-1]
    tensors = [bf16(s, seed=i) for i, s in enumerate(sizes)]
    prev = torch.zeros(n, dtype=torch.bfloat16)
    for o, t in zip(offs, tensors):
        prev[o:o + t.numel()] = t
    new = prev.clone()
    for o, s in zip(offs, sizes):
        new[o:o + s] = changed_copy(prev[o:o + s], frac, seed=o)
    buf, st = D.encode(prev, new)
    dests = [t.clone() for t in tensors]
    D.apply_segments(list(zip(offs, dests)), buf)
    for o, d in zip(offs, dests):
        assert torch.equal(bits(d), bits(new[o:o + d.numel()]))
    assert D.segments_checksum([(o, D.words(d, 2)) for o, d in zip(offs, dests)]) == D.checksum(new)
    if st.kind != D.FULL and st.changed:
        with pytest.raises(D.DeltaBaseMismatch):
            D.apply_segments(list(zip(offs, [t.clone() for t in dests])), buf)  # already at the target


@pytest.mark.parametrize("kind", ALL)
@pytest.mark.parametrize("dtype,word", [(torch.bfloat16, 2), (torch.bfloat16, 1), (torch.float32, 4),
                                        (torch.float64, 8), (torch.float32, 2)])
def test_target_sums_follow_from_the_changes(kind, dtype, word):
    # The sender computes the new checksum from the base and the changed words only; it must equal a full pass.
    prev = torch.randn(5 * 1024 + 3).to(dtype)
    new = changed_copy(prev, 0.05)
    base = D.sums(D.words(prev, word))
    buf, st = D.encode(prev, new, word=word, kinds=(kind,), base=base)
    assert st.target == D.sums(D.words(new, word))
    h = D.Header.unpack(buf)
    assert h.base == base.mixed == D.checksum(prev) and h.target == D.checksum(new)
    nxt = changed_copy(new, 0.05, seed=5)  # the kept target is the next push's base
    buf2, _ = D.encode(new, nxt, word=word, kinds=(kind,), base=st.target)
    dest = new.clone()
    D.decode_into(dest, buf2)
    assert torch.equal(bits(dest), bits(nxt))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frac", [0.0, 0.02, 0.3, 1.0])
def test_cuda_roundtrip_matches_cpu(frac):
    prev = bf16(1_000_003)
    new = changed_copy(prev, frac)
    cbuf, _ = D.encode(prev, new)
    gbuf, _ = D.encode(prev.cuda(), new.cuda())
    assert torch.equal(cbuf, gbuf.cpu())  # the same bytes on either device
    dest = prev.cuda()
    D.decode_into(dest, gbuf)
    assert torch.equal(bits(dest.cpu()), bits(new))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("frac", [0.0, 0.02, 0.3, 1.0])
def test_host_buffer_into_cuda_segments(frac):
    # a gloo push lands in host memory; a GPU engine's slices are the destination (the vLLM GPU delta path)
    sizes, offs = [1000, 77, 3001], [0, 1024, 1280]
    n = offs[-1] + sizes[-1]
    prev = torch.zeros(n, dtype=torch.bfloat16)
    for i, (o, s) in enumerate(zip(offs, sizes)):
        prev[o:o + s] = bf16(s, seed=i)
    new = prev.clone()
    for o, s in zip(offs, sizes):
        new[o:o + s] = changed_copy(prev[o:o + s], frac, seed=o)
    buf, st = D.encode(prev, new)
    dests = [prev[o:o + s].cuda() for o, s in zip(offs, sizes)]
    base = D.segments_sums([(2 * o, d) for o, d in zip(offs, dests)])
    D.apply_segments(list(zip(offs, dests)), buf, base=base if st.kind != D.FULL else None)
    for o, d in zip(offs, dests):
        assert torch.equal(bits(d.cpu()), bits(new[o:o + d.numel()]))
    if st.kind != D.FULL and st.changed:
        with pytest.raises(D.DeltaBaseMismatch):  # already at the target: refused, nothing written
            D.apply_segments(list(zip(offs, dests)), buf)


def test_cache_versions_cap_and_abandon():
    c = D.DeltaCache(cap_bytes=3000)
    a, b = bf16(500), bf16(700, seed=2)  # 1000 and 1400 bytes
    assert c.store("a", a) and c.store("b", b)
    assert c.base("a", 1000, 1) is None  # not acknowledged yet
    c.commit(1)
    data, s = c.base("a", 1000, 1)
    assert torch.equal(data, bits(a)) and s == D.sums(a)
    assert c.base("a", 1000, 2) is None and c.base("a", 998, 1) is None
    assert not c.store("c", bf16(400))  # 800 more bytes would pass the cap: never cached
    assert not c.store("c", bf16(400)) and c.nbytes == 2400
    a2 = changed_copy(a, 0.1)
    buf, st = D.encode(data, a2, base=s)
    c.store("a", a2, st.target)  # push 2 overwrites "a", then fails
    c.abandon()
    assert c.base("a", 1000, 1) is None and c.base("b", 1400, 1) is not None  # "a" goes full next time
    c.store("a", a2)
    c.commit(2)
    assert c.base("a", 1000, 2)[1] == st.target
    c.clear()
    assert c.nbytes == 0 and c.store("c", bf16(400))
