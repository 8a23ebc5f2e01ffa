"""`depthkd <verb>`: one entry point, each verb served by the module that owns it.

Only the chosen verb's module is imported, so `depthkd simulate` never pays for
torch and `depthkd --help` is instant. Each verb module defines
``add_cli_arguments(parser)`` and ``run_cli(args) -> int``.

The core's verbs are listed here. Other packages add theirs through the
``depthkd.verbs`` entry-point group, each entry a ``{verb: (module, help)}`` table
(depthkd_ros: ``depthkd_ros.verbs:VERBS``), so the core never names them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

VERB_GROUP = "depthkd.verbs"

CORE_VERBS: dict[str, tuple[str, str]] = {
    "simulate": ("depthkd_core.data.simulator", "render a procedural RGB-D dataset to disk"),
    "train": ("depthkd_core.train.supervised", "train a teacher or student with ground truth"),
    "evaluate": ("depthkd_core.evaluate.report", "evaluate a model on a dataset (JSON/markdown report)"),
    "make-student": ("depthkd_core.recipe",
                     "make a deployable student from a teacher: simulate, distil, export, provenance"),
    "bench-real": ("depthkd_core.bench.real",
                   "judge models on real RGB-D frames: accuracy and agreement with the teacher"),
    "export": ("depthkd_core.export.onnx_export", "export a checkpoint to ONNX and check parity"),
    "distill": ("depthkd_core.methods.engine", "distil a teacher into a student (config/distill/*.yaml)"),
    "bench-transform": ("depthkd_core.bench.transform",
                        "speed of the transformation net G vs per-batch input optimisation"),
    "bench": ("depthkd_core.bench.run", "data-free distillation benchmark, Table II (config/bench/*.yaml)"),
    "list": ("depthkd_core.catalog", "list the registered methods, models, losses or readers with their options"),
}


def verbs() -> dict[str, tuple[str, str]]:
    """The core's verbs plus those of every installed package in the ``depthkd.verbs`` group."""
    table = dict(CORE_VERBS)
    for entry in importlib.metadata.entry_points(group=VERB_GROUP):
        try:
            table.update(entry.load())
        except ImportError as exc:  # a broken plugin must not take the core's verbs with it
            print(f"depthkd: verbs of '{entry.value}' unavailable: {exc}", file=sys.stderr)
    return table


def _usage(table: dict[str, tuple[str, str]]) -> str:
    lines = ["usage: depthkd <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<16} {help_}" for verb, (_, help_) in table.items()]
    lines += ["", "`depthkd <verb> --help` shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = verbs()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(table))
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in table:
        print(f"depthkd: unknown verb '{verb}'\n\n{_usage(table)}", file=sys.stderr)
        return 2
    module_name, help_ = table[verb]
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
