"""Benchmarks: `m3i bench speed` (the step against peers and the machine's matmul peak)."""
