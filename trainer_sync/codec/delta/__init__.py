"""Delta pushes on the wire (issue 16): only the wire elements that changed since the receiver's version.

* format.py: the encodings (FULL / BITMASK / gap-coded INDICES), the 48-byte header, ``encode``;
* decode.py: applying an encoded buffer in place (``decode_into``, ``apply_segments``), checked before any write;
* checksums.py: the position-weighted checksum (``Sums``) that both sides check (the package's one checksum);
* cache.py: the trainer's last pushed bytes (``DeltaCache``), the base of the next push's deltas;
* native.py + native.c: the one-pass CPU kernels behind all of them (compiled on first use);
"""
from .cache import DeltaCache
from .checksums import (WORD_DTYPE, DeltaBaseMismatch, DeltaError, Sums, checksum, checksum_parts, segments_checksum,
                        segments_sums, sums, words)
from .decode import apply_segments, changes, decode_into
from .format import (BITMASK, FULL, GAP_WIDTHS, HEADER_BYTES, INDICES, KIND_NAMES, DeltaStats, Header, choose,
                     default_word, encode, encoded_sizes, max_gap)

__all__ = ["BITMASK", "FULL", "GAP_WIDTHS", "HEADER_BYTES", "INDICES", "KIND_NAMES", "WORD_DTYPE", "DeltaBaseMismatch",
           "DeltaCache", "DeltaError", "DeltaStats", "Header", "Sums", "apply_segments", "changes", "checksum",
           "checksum_parts", "choose", "decode_into", "default_word", "encode", "encoded_sizes", "max_gap",
           "segments_checksum", "segments_sums", "sums", "words"]
