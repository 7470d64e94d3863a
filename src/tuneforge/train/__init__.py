"""Training: the loop, its loss, optimizer and schedule, checkpoints, metrics and evaluation."""
