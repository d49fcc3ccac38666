"""The trainer: loop, optimizer and schedules, checkpoints, evaluation."""
