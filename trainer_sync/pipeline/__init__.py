"""The overlapped pack | wire | apply loops over any transport (loops.py), and the delta push loops beside them."""
