"""`paf-ray bench`: side-by-side ratios for the input pipeline, adapt vs finetune, torch.compile, Ray Train,
the LV-Adapter and GPU throughput (docs/benchmarks.md)."""

from paf_ray.bench.run import bench_command, run_bench

__all__ = ["bench_command", "run_bench"]
