"""Benchmarks, the main job (python -m bench) and the chapter-4 GPT workload."""
