"""Validation gate and the versioned model registry the live depth node reads.

The gate scores a candidate checkpoint (torch) and the live ONNX model (onnxruntime) by
AbsRel against the stored teacher depth on held-out keyframes, and deploys only when
``candidate_abs_rel < live_abs_rel - margin`` (margin absolute, in AbsRel units).
The versions it deploys are kept by ``online.registry.ModelRegistry`` (docs/online.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from depthkd_core.evaluate.metrics import compute_depth_metrics
from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.models import load_checkpoint
from depthkd_core.online.keyframes import KeyframeStore

Predict = Callable[[np.ndarray], np.ndarray]


def evaluate_against_teacher(model_predict: Predict, store: KeyframeStore, keys: list[str]) -> float:
    """Mean per-frame AbsRel of ``model_predict(rgb)`` against the stored teacher output.

    The prediction is resized to the teacher map. Metric teacher: plain AbsRel.
    Relative depth teacher: the prediction is median-scaled to it first. Inverse-depth
    (disparity) teacher: 1 / prediction is lsq (scale + shift) aligned to the disparity
    and AbsRel is taken in disparity space. Keys without teacher depth are skipped.
    """
    scores = []
    for key in keys:
        reference, info = store.teacher_depth(key), store.teacher_info(key)
        if reference is None or info is None:
            continue
        pred = np.asarray(model_predict(store.load(key).rgb), np.float32)
        pred = cv2.resize(pred, (reference.shape[1], reference.shape[0]), interpolation=cv2.INTER_LINEAR)
        alignment = "none" if info["is_metric"] else ("lsq" if info["is_inverse"] else "median")
        if info["is_inverse"]:
            pred = 1.0 / np.maximum(pred, 1e-6)
        metrics = compute_depth_metrics(pred, reference, min_depth=1e-6, max_depth=np.inf,
                                        alignment=alignment)
        scores.append(metrics["abs_rel"])
    if not scores:
        raise ValueError(f"no keyframes with teacher depth among {len(keys)} keys of {store.root}")
    return float(np.mean(scores))


def checkpoint_predictor(path: str | Path, size: tuple[int, int] | None = None) -> Predict:
    """rgb -> depth of a depthkd checkpoint at ``size`` (H, W), else the image size rounded to 32."""
    model, _, _ = load_checkpoint(path)
    model.eval()

    def predict(rgb: np.ndarray) -> np.ndarray:
        h, w = size or (max(32, round(rgb.shape[0] / 32) * 32), max(32, round(rgb.shape[1] / 32) * 32))
        image = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA) if rgb.shape[:2] != (h, w) else rgb
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            return model(x)[0, 0].numpy()

    return predict


@dataclass
class GateDecision:
    deploy: bool
    live_abs_rel: float
    candidate_abs_rel: float
    margin: float
    reason: str


def gate(candidate_ckpt: str | Path, live_onnx: str | Path, store: KeyframeStore,
         margin: float) -> GateDecision:
    """Deploy iff candidate AbsRel < live AbsRel - margin on the store's holdout keys.

    The candidate runs at the live model's input size when that is fixed, so both see
    the same pixels.
    """
    if margin < 0:
        raise ValueError(f"gate margin must be >= 0, got {margin}")
    keys = store.holdout_keys()
    live = OnnxDepthModel(live_onnx, providers="cpu")
    live_score = evaluate_against_teacher(live.predict, store, keys)
    cand_score = evaluate_against_teacher(checkpoint_predictor(candidate_ckpt, live.input_size), store, keys)
    deploy = cand_score < live_score - margin
    verdict = "better" if deploy else "not better"
    reason = (f"candidate AbsRel {cand_score:.4f} vs live {live_score:.4f} on {len(keys)} holdout "
              f"keys: {verdict} by the margin {margin:g}")
    return GateDecision(deploy, live_score, cand_score, margin, reason)
