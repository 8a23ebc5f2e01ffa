"""The core's benchmarks: `depthkd bench` (the data-free distillation benchmark, Table II
of Hu et al., end to end: ``run``), `bench-real` (models on real RGB-D frames: ``real``)
and `bench-transform` (G against per-batch optimisation: ``transform``).

See docs/benchmark.md. ``run_bench(load_preset("quick"), "runs/bench/quick")``.
"""

from depthkd_core.bench.preset import BenchPreset, load_preset
from depthkd_core.bench.table import check_claim, recovery_ratio

__all__ = ["BenchPreset", "load_preset", "check_claim", "recovery_ratio"]
