/* One-pass kernels behind trainer_sync/codec/delta/ on CPU (loaded by native.py through ctypes).
 *
 * Why C: the torch path of a delta encode makes ~6 passes over a bucket with large temporaries (a 64-bit compare
 * mask, nonzero, gathers, two checksum passes); on a 2-core host that costs ~10x the bucket's memory bandwidth.
 * Here the compare, the changed positions and values, the checksum change and the filler counts of every gap width
 * come out of one read of both buffers, and the receiver's base checksum is one read of its destination.
 *
 * Conventions (those of delta.py): a bucket is read as little-endian 64-bit words, the last one zero-padded; word q
 * sits in checksum row q / 1024 and column q % 1024 and weighs row + 1 / column + 1; sums wrap modulo 2^64.
 * Elements are `word` bytes (1, 2, 4 or 8); positions are element indices into the bucket, sorted.
 */
#include <stdint.h>
#include <string.h>

#define ROW 1024

static inline uint64_t load64(const uint8_t *p, int64_t nbytes, int64_t q) {
    uint64_t v = 0;
    int64_t at = q * 8, left = nbytes - at;
    memcpy(&v, p + at, left >= 8 ? 8 : (size_t)left);
    return v;
}

/* Checksum parts of `nbytes` bytes at `p` whose first 64-bit word is word `start` of its bucket:
 * out = [sum, row-weighted sum, column-weighted sum]. Column sums are kept per column (adds only, which vectorize),
 * weighted once at the end. */
void td_sums(const uint8_t *p, int64_t nbytes, int64_t start, uint64_t *out) {
    uint64_t col[ROW];
    memset(col, 0, sizeof col);
    uint64_t total = 0, by_row = 0;
    int64_t nq = (nbytes + 7) / 8, q = 0;
    while (q < nq) {
        int64_t g = start + q, c0 = g % ROW, len = ROW - c0;
        if (len > nq - q) len = nq - q;
        uint64_t rs = 0;
        if (q + len < nq || nbytes % 8 == 0) {
            const uint64_t *w = (const uint64_t *)(p + q * 8);
            uint64_t buf[ROW];
            memcpy(buf, w, (size_t)len * 8); /* unaligned-safe */
            for (int64_t i = 0; i < len; i++) { rs += buf[i]; col[c0 + i] += buf[i]; }
        } else {
            for (int64_t i = 0; i < len; i++) { uint64_t v = load64(p, nbytes, q + i); rs += v; col[c0 + i] += v; }
        }
        total += rs;
        by_row += rs * (uint64_t)(g / ROW + 1);
        q += len;
    }
    uint64_t by_col = 0;
    for (int i = 0; i < ROW; i++) by_col += col[i] * (uint64_t)(i + 1);
    out[0] = total; out[1] = by_row; out[2] = by_col;
}

/* Scan `prev` against `new` (bucket bytes, `nbytes` each) from 64-bit word `*resume`: every changed element's
 * position goes to pos[], its new value to vals[] (`word` bytes each), until `cap` entries are written.
 * parts[3] accumulates the checksum change (new minus old, per changed 64-bit word), fill[3] the filler entries that
 * gap widths 1, 2 and 4 bytes need, *last the previous changed position (0 before the first: it gaps from 0).
 * With `update`, the changed 64-bit words of `prev` are overwritten with `new` (prev becomes new).
 * Returns the entries written; *resume is nq when the scan finished, else where to go on (cap was reached). */
static inline __attribute__((always_inline)) int64_t
scan_impl(uint8_t *prev, const uint8_t *new_, int64_t nbytes, const int word, int64_t *pos, uint8_t *vals,
          int64_t cap, int update, int64_t *resume, uint64_t *parts, int64_t *fill, int64_t *last) {
    const int per = 8 / word, bits = 8 * word;
    const uint64_t mask = word == 8 ? ~(uint64_t)0 : (((uint64_t)1 << bits) - 1);
    const int64_t nq = (nbytes + 7) / 8, whole = nbytes / 8;
    const int64_t maxg[3] = {255, 65535, 2147483647};
    int64_t k = 0, q = *resume, lastp = *last;
    uint64_t total = parts[0], by_row = parts[1], by_col = parts[2];
    while (q < nq) {
        uint64_t a, b;
        if (q < whole) {
            /* the common case: runs of equal words, compared four at a time */
            if (q + 4 <= whole) {
                uint64_t a4[4], b4[4];
                memcpy(a4, prev + q * 8, 32); memcpy(b4, new_ + q * 8, 32);
                if (((a4[0] ^ b4[0]) | (a4[1] ^ b4[1]) | (a4[2] ^ b4[2]) | (a4[3] ^ b4[3])) == 0) { q += 4; continue; }
            }
            memcpy(&a, prev + q * 8, 8); memcpy(&b, new_ + q * 8, 8);
        } else {
            a = load64(prev, nbytes, q); b = load64(new_, nbytes, q);
        }
        uint64_t x = a ^ b;
        if (x == 0) { q++; continue; }
        if (k + per > cap) break; /* no room for this word's lanes: resume at q with a new buffer */
        for (int l = 0; l < per; l++) {
            if (((x >> (l * bits)) & mask) == 0) continue; /* lanes past n are zero padding on both sides */
            const int64_t p = q * per + l;
            const uint64_t v = (b >> (l * bits)) & mask;
            memcpy(vals + k * word, &v, (size_t)word);
            pos[k++] = p;
            const int64_t g = p - lastp;
            if (g > 255) for (int w = 0; w < 3; w++) fill[w] += (g - 1) / maxg[w]; /* rare */
            lastp = p;
        }
        uint64_t d = b - a;
        total += d;
        by_row += d * (uint64_t)(q / ROW + 1);
        by_col += d * (uint64_t)(q % ROW + 1);
        if (update) {
            if (q < whole) memcpy(prev + q * 8, &b, 8);
            else memcpy(prev + q * 8, &b, (size_t)(nbytes - q * 8));
        }
        q++;
    }
    parts[0] = total; parts[1] = by_row; parts[2] = by_col;
    *resume = q; *last = lastp;
    return k;
}

/* The word size as a compile-time constant in each branch, so the lane loops unroll (bf16: word 2). */
int64_t td_scan(uint8_t *prev, const uint8_t *new_, int64_t nbytes, int word, int64_t *pos, uint8_t *vals,
                int64_t cap, int update, int64_t *resume, uint64_t *parts, int64_t *fill, int64_t *last) {
    switch (word) {
    case 1: return scan_impl(prev, new_, nbytes, 1, pos, vals, cap, update, resume, parts, fill, last);
    case 2: return scan_impl(prev, new_, nbytes, 2, pos, vals, cap, update, resume, parts, fill, last);
    case 4: return scan_impl(prev, new_, nbytes, 4, pos, vals, cap, update, resume, parts, fill, last);
    default: return scan_impl(prev, new_, nbytes, 8, pos, vals, cap, update, resume, parts, fill, last);
    }
}

/* The INDICES body: gaps of `width` bytes between the sorted positions pos[0..count) with fillers (an extra entry
 * every max-gap elements inside a longer gap, carrying the unchanged value from `new`), into gaps_out, and the
 * values (changed ones from vals[], fillers' from new_) into vals_out. Returns the entries written. */
int64_t td_indices(const int64_t *pos, const uint8_t *vals, int64_t count, const uint8_t *new_, int word, int width,
                   uint8_t *gaps_out, uint8_t *vals_out) {
    const int64_t m = width == 1 ? 255 : width == 2 ? 65535 : 2147483647;
    int64_t k = 0, at = 0;
    for (int64_t i = 0; i < count; i++) {
        int64_t g = pos[i] - at;
        while (g > m) { /* a filler at at + m */
            uint32_t gm = (uint32_t)m;
            at += m;
            memcpy(gaps_out + k * width, &gm, (size_t)width);
            memcpy(vals_out + k * word, new_ + at * word, (size_t)word);
            k++;
            g -= m;
        }
        uint32_t gg = (uint32_t)g;
        memcpy(gaps_out + k * width, &gg, (size_t)width);
        memcpy(vals_out + k * word, vals + i * word, (size_t)word);
        k++;
        at = pos[i];
    }
    return k;
}

/* The BITMASK meta: bit p of the (zeroed) `out` set for each of the `count` positions. */
void td_setbits(const int64_t *pos, int64_t count, uint8_t *out) {
    for (int64_t i = 0; i < count; i++) out[pos[i] >> 3] |= (uint8_t)(1u << (pos[i] & 7));
}

/* Positions from `count` gaps of `width` bytes (a running sum). Returns the last position (-1 if none). */
int64_t td_positions(const uint8_t *gaps, int64_t count, int width, int64_t *pos) {
    int64_t at = 0;
    for (int64_t i = 0; i < count; i++) {
        uint32_t g = 0;
        memcpy(&g, gaps + i * width, (size_t)width);
        at += (int64_t)g;
        pos[i] = at;
    }
    return count ? at : -1;
}

/* Positions of the set bits of a bitmask of n elements (bit i of byte j = element 8j + i). Returns how many, at most
 * cap (more set bits: returns cap + 1 and stops). */
int64_t td_bits(const uint8_t *bits, int64_t n, int64_t *pos, int64_t cap) {
    int64_t k = 0;
    for (int64_t j = 0; j * 8 < n; j++) {
        uint8_t b = bits[j];
        while (b) {
            int i = __builtin_ctz(b);
            int64_t p = j * 8 + i;
            if (p < n) { if (k == cap) return cap + 1; pos[k++] = p; }
            b &= (uint8_t)(b - 1);
        }
    }
    return k;
}

/* How the checksum parts change (added to parts[3]) when the elements at bucket positions pos[0..count) of a segment
 * `dest` (element 0 of dest = bucket element `off`, `dlen` elements) go from their current values to vals[].
 * Returns 0, or 1 when a position falls outside the segment (nothing more is read). */
static inline __attribute__((always_inline)) int
change_impl(const uint8_t *dest, int64_t off, int64_t dlen, const int64_t *pos, const uint8_t *vals, int64_t count,
            const int word, uint64_t *parts) {
    const int per = 8 / word;
    const uint64_t mask = word == 8 ? ~(uint64_t)0 : (((uint64_t)1 << (8 * word)) - 1);
    uint64_t total = parts[0], by_row = parts[1], by_col = parts[2];
    for (int64_t i = 0; i < count; i++) {
        int64_t e = pos[i] - off;
        if (e < 0 || e >= dlen) return 1;
        uint64_t o = 0, v = 0;
        memcpy(&o, dest + e * word, (size_t)word);
        memcpy(&v, vals + i * word, (size_t)word);
        uint64_t p = (uint64_t)pos[i];
        uint64_t d = ((v & mask) - (o & mask)) << (8 * word * (int)(p % per));
        uint64_t q = p / per;
        total += d;
        by_row += d * (q / ROW + 1);
        by_col += d * (q % ROW + 1);
    }
    parts[0] = total; parts[1] = by_row; parts[2] = by_col;
    return 0;
}

int td_change(const uint8_t *dest, int64_t off, int64_t dlen, const int64_t *pos, const uint8_t *vals, int64_t count,
              int word, uint64_t *parts) {
    switch (word) {
    case 1: return change_impl(dest, off, dlen, pos, vals, count, 1, parts);
    case 2: return change_impl(dest, off, dlen, pos, vals, count, 2, parts);
    case 4: return change_impl(dest, off, dlen, pos, vals, count, 4, parts);
    default: return change_impl(dest, off, dlen, pos, vals, count, 8, parts);
    }
}

/* dest[pos[i] - off] = vals[i] for the `count` positions (already checked to fall inside the segment). */
void td_scatter(uint8_t *dest, int64_t off, const int64_t *pos, const uint8_t *vals, int64_t count, int word) {
    switch (word) {
    case 2:
        for (int64_t i = 0; i < count; i++) memcpy(dest + (pos[i] - off) * 2, vals + i * 2, 2);
        break;
    default:
        for (int64_t i = 0; i < count; i++) memcpy(dest + (pos[i] - off) * word, vals + i * word, (size_t)word);
    }
}
