"""Delta pushes on the wire: format.py (encodings, checksums, the sender's cache), native.py + native.c (the
one-pass CPU kernels, compiled on first use)."""
