"""Benchmarks: throughput, latency, memory, profile and crash accounting against a real local broker.

Run `make bench` (full size) or `python -m bench.run --quick` (smoke run); results go to bench/results/.
"""
