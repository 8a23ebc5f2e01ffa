"""`depthkd <verb>`: one entry point, each verb served by the module that owns it.

Only the chosen verb's module is imported, so `depthkd simulate` never pays for
torch and `depthkd --help` is instant. Each verb module defines
``add_cli_arguments(parser)`` and ``run_cli(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS: dict[str, tuple[str, str]] = {
    "simulate": ("depthkd_core.data.simulator", "render a procedural RGB-D dataset to disk"),
    "train": ("depthkd_core.train.supervised", "train a teacher or student with ground truth"),
    "evaluate": ("depthkd_core.evaluate.report", "evaluate a model on a dataset (JSON/markdown report)"),
    "make-student": ("depthkd_core.recipe",
                     "make a deployable student from a teacher: simulate, distil, export, provenance"),
    "bench-real": ("depthkd_core.bench.real",
                   "judge models on real RGB-D frames: accuracy and agreement with the teacher"),
    "export": ("depthkd_core.export.onnx_export", "export a checkpoint to ONNX and check parity"),
    "distill": ("depthkd_core.methods.engine", "distil a teacher into a student (config/distill/*.yaml)"),
    "bench-transform": ("depthkd_core.methods.deepinversion",
                        "speed of the transformation net G vs per-batch input optimisation"),
    "demo": ("depthkd_ros.demo", "run the live depth node on the bundled sequence"),
    "bench": ("depthkd_core.bench.run", "data-free distillation benchmark, Table II (config/bench/*.yaml)"),
    "bench-node": ("depthkd_ros.bench", "measure the live node: inference, overhead, rates, memory"),
    "fuzz-node": ("depthkd_ros.tools.fuzz_node",
                  "feed the live node malformed messages: crashes, peak memory, output drift"),
    "bench-distill": ("depthkd_ros.bench_distill",
                      "on-robot distillation loop: keyframes/s, teacher ms, steps/s, AbsRel"),
}


def _usage() -> str:
    lines = ["usage: depthkd <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<16} {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`depthkd <verb> --help` shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"depthkd: unknown verb '{verb}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"depthkd {verb}", description=help_)
    module.add_cli_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run_cli(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"depthkd {verb}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
