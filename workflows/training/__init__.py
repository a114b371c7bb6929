"""The training loop: a run's parts, the trainer, crash recovery, graceful shutdown and evaluation."""
