"""Benchmarks: per-stage latency of each backend against the PyTorch baseline, measured in the same run."""
