"""`depthkd bench-transform`: the transformation net G against per-batch input optimisation.

Trains G for k steps, then compares, on one held-out batch of the same teacher, the BN
loss G reaches in one forward with the wall time DeepInversion-style optimisation of the
pixels (``methods.deepinversion.invert_batch``) needs to reach the same BN loss::

    depthkd bench-transform --teacher T.pt --data data/sim_train [--g-steps 200] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from depthkd_core.data import DepthDataset, build_reader
from depthkd_core.data.mixing import ObjectMixer
from depthkd_core.methods.datafree import DatafreeConfig, check_g_teacher, transform_objective
from depthkd_core.methods.deepinversion import invert_batch
from depthkd_core.models import Teacher, load_teacher
from depthkd_core.models.transform_net import TransformationNet


def _batches(data: str, reader: str, height: int, width: int, batch_size: int
             ) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    dataset = DepthDataset(build_reader(reader, data), height, width)
    if len(dataset) < 2 * batch_size:
        raise ValueError(f"bench-transform needs >= {2 * batch_size} frames in {data} "
                         f"(training batches plus a held-out one), found {len(dataset)}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    held_out, *train = list(loader)
    return held_out, train


def bench_transform(teacher: Teacher, data: str, reader: str = "sim", height: int = 256,
                    width: int = 320, batch_size: int = 8, g_steps: int = 200,
                    max_iterations: int = 2000, lr_x: float = 0.01,
                    opts: DatafreeConfig | None = None) -> dict[str, float]:
    """G after ``g_steps`` vs per-batch optimisation to G's BN loss, on one held-out batch."""
    opts = opts or DatafreeConfig()
    bn_loss = check_g_teacher(teacher)
    torch.manual_seed(0)
    mixer = ObjectMixer(opts.mix_fraction)
    held_out, train = _batches(data, reader, height, width, batch_size)
    g = TransformationNet(opts.g_channels, opts.g_dilations, opts.g_init_scale)
    optimizer = torch.optim.Adam(g.parameters(), lr=opts.lr_g)
    start = time.perf_counter()
    for step in range(g_steps):
        batch = train[step % len(train)]
        x_mix = mixer(batch["image"], batch["semantic"]).images
        loss, _, _ = transform_objective(g(x_mix), x_mix, teacher, bn_loss, opts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start
    x_mix = mixer(held_out["image"], held_out["semantic"]).images
    with torch.no_grad():
        start = time.perf_counter()
        gx = g(x_mix)
        g_seconds = time.perf_counter() - start
    _, _, input_terms = transform_objective(x_mix, x_mix, teacher, bn_loss, opts)
    _, _, g_terms = transform_objective(gx, x_mix, teacher, bn_loss, opts)
    inverted = invert_batch(x_mix, teacher, bn_loss, opts, max_iterations, lr_x,
                            target_bn=float(g_terms["bn"]))
    return {"bn_input": float(input_terms["bn"]), "bn_g": float(g_terms["bn"]),
            "g_forward_s": g_seconds, "g_train_s": train_seconds, "g_steps": g_steps,
            "bn_inversion": inverted.bn, "inversion_iterations": inverted.iterations,
            "inversion_s": inverted.seconds,
            "reached": inverted.bn <= float(g_terms["bn"]),
            "speedup": inverted.seconds / max(g_seconds, 1e-9)}


def format_report(result: dict[str, float], batch_size: int, height: int, width: int) -> str:
    reached = "reached" if result["reached"] else "NOT reached within the iteration limit"
    return "\n".join([
        f"batch {batch_size}x3x{height}x{width}; L_bn of the mixed input: {result['bn_input']:.4g}",
        "| method | L_bn | wall time (s) | iterations |", "|---|---|---|---|",
        f"| G, one forward (after {result['g_steps']} training steps, "
        f"{result['g_train_s']:.1f} s) | {result['bn_g']:.4g} | {result['g_forward_s']:.4f} | 1 |",
        f"| per-batch optimisation (Adam on pixels) | {result['bn_inversion']:.4g} | "
        f"{result['inversion_s']:.3f} | {result['inversion_iterations']} |",
        f"equal BN loss {reached}; per-batch optimisation / G forward: {result['speedup']:.0f}x"])


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="torch teacher with BatchNorm (checkpoint)")
    parser.add_argument("--data", required=True, help="transfer images with semantic maps")
    parser.add_argument("--reader", default="sim")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--g-steps", type=int, default=200, help="G training steps before timing")
    parser.add_argument("--max-iterations", type=int, default=2000,
                        help="per-batch optimisation limit (DeepInversion uses thousands)")
    parser.add_argument("--lr-x", type=float, default=0.01, help="Adam rate on the pixels")
    parser.add_argument("--lr-g", type=float, default=1e-4, help="Adam rate of G")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")


def run_cli(args: argparse.Namespace) -> int:
    teacher = load_teacher(args.teacher)
    opts = replace(DatafreeConfig(), lr_g=args.lr_g)
    result = bench_transform(teacher, args.data, args.reader, args.height, args.width,
                             args.batch_size, args.g_steps, args.max_iterations, args.lr_x, opts)
    print(format_report(result, args.batch_size, args.height, args.width))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
