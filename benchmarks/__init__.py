"""Benchmarks of the LoRA from Scratch code (run as python -m benchmarks.<name>)."""
