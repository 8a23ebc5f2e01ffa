"""The command line shared by `depthkd train` and `depthkd distill`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist


def add_run_arguments(parser: argparse.ArgumentParser, config_dir: str, example: str) -> None:
    parser.add_argument("--config", type=Path, required=True, help=f"YAML file in {config_dir}")
    parser.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"config overrides, e.g. {example}")


def run_from_args(args: argparse.Namespace,
                  load_config: Callable[[Path, list[str]], Any],
                  run: Callable[[Any], Path]) -> int:
    """Load the config, apply --out/--resume, run, and leave torchrun's group cleanly."""
    cfg = load_config(args.config, args.overrides)
    # set directly: a path is not a YAML scalar (``--out 2024`` would become an int)
    if args.out is not None:
        cfg = replace(cfg, out_dir=str(args.out))
    if args.resume:
        cfg = replace(cfg, resume=True)
    final = run(cfg)
    if dist.is_initialized():  # joined under torchrun by the Trainer
        dist.destroy_process_group()
    print(f"final checkpoint: {final}")
    return 0
