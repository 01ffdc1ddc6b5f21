"""One push on one rank: sender.py (a trainer rank), receiver.py (an engine worker), catchup.py (P2P catch-up)."""
