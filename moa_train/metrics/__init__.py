"""Metric sinks (jsonl always; TensorBoard and W&B when chosen) and the FLOP / MFU counter."""
