"""Merge-quality benchmark: real models, real tasks, every method through mlite's own API.

Run `python -m benchmarks.quality.run --all` from the repository root (see README.md).
"""
