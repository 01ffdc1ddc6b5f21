"""What a push measured, written where people look: tensorboard.py (SyncMetrics, TensorBoard event files)."""
