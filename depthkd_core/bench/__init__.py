"""`depthkd bench`: the data-free distillation benchmark (Table II of Hu et al.), end to end.

See docs/benchmark.md. ``run_bench(load_preset("quick"), "runs/bench/quick")``.
"""

from depthkd_core.bench.preset import BenchPreset, load_preset
from depthkd_core.bench.table import check_claim, recovery_ratio

__all__ = ["BenchPreset", "load_preset", "check_claim", "recovery_ratio"]
