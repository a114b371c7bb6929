"""Per-step statistics, trackers (TensorBoard, W&B) and plots."""
