"""Benchmarks: side-by-side ratios for the input pipeline, adapt vs finetune, Ray overhead,
LV-Adapter and GPU throughput (`paf-ray bench`; see docs/benchmarks.md)."""

from paf_ray.bench.run import bench_command, run_bench

__all__ = ["bench_command", "run_bench"]
