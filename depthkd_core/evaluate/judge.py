"""Judge one depth model on a set of RGB-D frames: against their ground truth and, given
a teacher, against the teacher's depth (agreement, which needs no ground truth).

bench-real runs it on real frames; the student recipe on its held-out simulated frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from depthkd_core.evaluate.metrics import compute_depth_metrics


@dataclass
class RealSet:
    """Frames to judge on (real ones here; the recipe's held-out simulated set too):
    ``reader`` key, its ``root`` and keyword arguments. Frames without ground truth (the
    ``images`` reader) are judged by agreement only. ``optional``: a set whose folder is
    missing is left out (with a notice) instead of failing the run."""

    name: str
    reader: str
    root: str
    reader_kwargs: dict[str, Any] = field(default_factory=dict)
    optional: bool = False


def frames_of(real: RealSet, height: int, width: int) -> list[dict[str, torch.Tensor]]:
    from depthkd_core.data import DepthDataset, build_reader

    dataset = DepthDataset(build_reader(real.reader, real.root, **real.reader_kwargs), height, width)
    return [dataset[i] for i in range(len(dataset))]


def judge(model: Any, teacher: Any | None, frames: list[dict[str, torch.Tensor]], min_depth: float,
          max_depth: float) -> dict[str, float]:
    """Mean metrics of ``model`` over ``frames``: against ground truth (``gt_*``, metric;
    ``gt_med_*``, median-aligned; over the frames that have any) and, given a ``teacher``,
    against it (``agree_*``, metric) with the lowest per-frame agreement delta1
    (``agree_delta1_min``)."""
    rows: dict[str, list[float]] = {}
    with torch.inference_mode():
        for frame in frames:
            image = frame["image"][None]
            pred = model(image)
            targets = []
            if bool(frame["valid"].any()):
                gt = torch.where(frame["valid"], frame["depth"], torch.zeros_like(frame["depth"]))[None]
                targets += [("gt_", gt, "none"), ("gt_med_", gt, "median")]
            if teacher is not None:
                targets.append(("agree_", teacher(image), "none"))
            for prefix, target, align in targets:
                m = compute_depth_metrics(pred, target, min_depth, max_depth, alignment=align)
                for key in ("abs_rel", "rmse", "delta1"):
                    rows.setdefault(prefix + key, []).append(m[key])
    result = {key: float(np.mean(values)) for key, values in rows.items()}
    if teacher is not None:
        result["agree_delta1_min"] = float(np.min(rows["agree_delta1"]))
    result["frames"] = len(frames)
    return result
