"""Evaluate a depth model on a dataset and report accuracy with cost (`depthkd evaluate`).

Every accuracy row carries the alignment and crop it was computed with, and the
model's parameters, MACs and latency where they can be measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from depthkd_core.evaluate.metrics import CROPS, Crop, MetricAccumulator
from depthkd_core.evaluate.profile import (count_macs, count_parameters, eval_mode, onnx_cost,
                                           measure_latency)
from depthkd_core.geometry.alignment import ALIGN_MODES, AlignMode

log = logging.getLogger(__name__)

Predict = Callable[[torch.Tensor], torch.Tensor]


def _device(predict: Predict) -> torch.device:
    if isinstance(predict, torch.nn.Module):
        for p in predict.parameters():
            return p.device
    return torch.device("cpu")


def evaluate_model(predict: Predict, dataset: Dataset | Sequence[dict[str, Any]],
                   min_depth: float = 1e-3, max_depth: float = 10.0, crop: Crop = None,
                   alignment: AlignMode = "none", limit: int | None = None,
                   batch_size: int = 1, num_workers: int = 0, progress: bool = True,
                   inverse: bool = False, reference: Predict | None = None) -> dict[str, float]:
    """Mean per-image depth metrics of ``predict`` over ``dataset`` (plus ``count``).

    ``predict`` maps images (B,3,H,W) in [0,1] to depth (B,1,H,W): a ``DepthNet``
    or a ``Teacher``. ``dataset`` yields ``DepthDataset`` dicts (``image``,
    ``depth``, ``valid``, ``has_depth``); samples without depth are skipped.
    ``inverse``: the predictions are relative inverse depth (``Teacher.is_inverse``).
    ``reference``: another model's depth is the ground truth (agreement with a
    teacher; needs no labels, so every sample counts).
    """
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = _device(predict)
    acc = MetricAccumulator()
    skipped = 0
    with eval_mode(predict), torch.inference_mode():
        for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
            images = batch["image"]
            if reference is not None:
                gt = reference(images.to(_device(reference))).to("cpu")
            else:
                has = batch.get("has_depth", torch.ones(len(images), dtype=torch.bool))
                skipped += int((~has).sum())
                if not has.any():
                    continue
                images, gt = images[has], batch["depth"][has]
                if "valid" in batch:
                    gt = torch.where(batch["valid"][has], gt, torch.zeros_like(gt))
            pred = predict(images.to(device))
            if tuple(pred.shape) != tuple(gt.shape):
                raise ValueError(f"prediction shape {tuple(pred.shape)} does not match ground "
                                 f"truth shape {tuple(gt.shape)}")
            acc.update(pred, gt, min_depth=min_depth, max_depth=max_depth, crop=crop,
                       alignment=alignment, inverse=inverse)
    if acc.count == 0:
        raise ValueError(f"no sample of the dataset has ground-truth depth ({skipped} samples "
                         "without depth); evaluation needs a reader that provides depth")
    if skipped:
        log.warning("skipped %d sample(s) without ground-truth depth", skipped)
    return acc.compute()


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isfinite(value) and abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")


def to_markdown(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """GitHub markdown table; columns default to every key in first-seen order.

    Numeric columns are right-aligned and floats shown with 4 decimals.
    """
    if not rows:
        raise ValueError("to_markdown needs at least one row")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    numeric = [all(isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
                   for row in rows if c in row) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_format(row[c]) if c in row else "" for c in columns) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def model_cost(teacher: Any, input_shape: tuple[int, int, int, int],
               latency_runs: int = 10) -> dict[str, float]:
    """``params_M`` and ``GMACs`` of the torch module or ONNX file inside (ONNX MACs only
    when shape inference resolves them); ``latency_ms`` (median) always."""
    cost: dict[str, float] = {}
    module = getattr(teacher, "module", None)
    onnx_path = getattr(getattr(teacher, "model", None), "path", None)
    if module is not None:
        cost["params_M"] = count_parameters(module) / 1e6
        cost["GMACs"] = count_macs(module, input_shape) / 1e9
    elif onnx_path is not None:
        # a fixed-size file runs at its own size whatever the images are resized from
        size = getattr(teacher, "input_size", None) or tuple(input_shape[2:])
        params, macs = onnx_cost(onnx_path, (1, input_shape[1], *size))
        cost["params_M"] = params / 1e6
        if macs is not None:
            cost["GMACs"] = macs / 1e9
    if latency_runs > 0:
        cost["latency_ms"] = measure_latency(teacher, input_shape, runs=latency_runs)["median_ms"]
    return cost


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from depthkd_core.models.teachers import TEACHER_OUTPUTS

    parser.add_argument("--model", required=True,
                        help="depthkd checkpoint (.pt), TorchScript file, .onnx or HF folder")
    parser.add_argument("--data", required=True, help="dataset folder or file for --reader")
    parser.add_argument("--model-output", default="auto",
                        choices=TEACHER_OUTPUTS,
                        help="what an ONNX/TorchScript --model predicts (relative_inverse: "
                             "affine-invariant disparity, e.g. a MiDaS export)")
    parser.add_argument("--teacher", default=None,
                        help="also report agreement with this model (agree_* columns: its depth "
                             "as the reference, metric; needs no ground truth)")
    parser.add_argument("--reader", default="sim", help="dataset reader key (sim, tum, nyu_png, kitti, ...)")
    parser.add_argument("--height", type=int, default=224, help="input height fed to the model")
    parser.add_argument("--width", type=int, default=224, help="input width fed to the model")
    parser.add_argument("--min-depth", type=float, default=1e-3)
    parser.add_argument("--max-depth", type=float, default=10.0)
    parser.add_argument("--crop", choices=("none",) + CROPS, default="none")
    parser.add_argument("--alignment", choices=("auto",) + ALIGN_MODES, default="auto",
                        help="auto: none for metric models, lsq for relative ones "
                             "(in disparity space for inverse-depth models)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N samples")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--latency-runs", type=int, default=10, help="0 skips the latency measurement")
    parser.add_argument("--json", type=Path, default=None, help="write the row as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--no-progress", action="store_true")


def run_cli(args: argparse.Namespace) -> int:
    from depthkd_core.data import DepthDataset, build_reader
    from depthkd_core.models.teachers import load_teacher

    teacher = load_teacher(args.model, output=args.model_output)
    dataset = DepthDataset(build_reader(args.reader, args.data), args.height, args.width)
    alignment = args.alignment
    if alignment == "auto":
        alignment = "none" if teacher.is_metric else "lsq"
    crop = None if args.crop == "none" else args.crop
    inverse = bool(teacher.is_inverse)
    metrics: dict[str, float] = {}
    # agreement needs no labels: with --teacher, a dataset without depth gives agreement only
    if args.teacher is None or bool(dataset[0]["has_depth"]):
        metrics = evaluate_model(teacher, dataset, min_depth=args.min_depth, max_depth=args.max_depth,
                                 crop=crop, alignment=alignment, limit=args.limit,
                                 batch_size=args.batch_size, num_workers=args.workers,
                                 progress=not args.no_progress, inverse=inverse)
    row: dict[str, Any] = {"model": teacher.name, "data": f"{args.reader}:{Path(args.data).name}",
                           "size": f"{args.height}x{args.width}", "crop": args.crop,
                           "alignment": f"{alignment} (disparity)" if inverse else alignment,
                           **metrics}
    if args.teacher is not None:
        agreement = evaluate_model(teacher, dataset, min_depth=args.min_depth, max_depth=args.max_depth,
                                   crop=crop, limit=args.limit, batch_size=args.batch_size,
                                   num_workers=args.workers, progress=not args.no_progress,
                                   reference=load_teacher(args.teacher))
        row.update({f"agree_{key}": agreement[key] for key in ("abs_rel", "rmse", "delta1")})
    row.update(model_cost(teacher, (1, 3, args.height, args.width), args.latency_runs))
    table = to_markdown([row])
    print(table, end="")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    return 0
