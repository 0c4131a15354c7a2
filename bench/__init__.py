"""Benchmarks (python bench/X.py --help; python bench/run_all.py). Not tests: see docs/performance.md."""
