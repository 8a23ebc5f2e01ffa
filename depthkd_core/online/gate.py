"""The validation gate: does a candidate ONNX beat the live one on held-out keyframes?

Both models run in onnxruntime (no torch: the gate can run in any process) on the
store's held-out keyframes, real frames the camera sent and the student never trained
on, and are scored by AbsRel against the stored teacher depth. Deploy only when
``candidate_abs_rel < live_abs_rel - margin`` (margin absolute, in AbsRel units) and the
candidate's depth is finite on every held-out keyframe.
``checkpoint_predictor`` (torch, imported late) scores a checkpoint the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from depthkd_core.evaluate.metrics import compute_depth_metrics
from depthkd_core.imaging import resize_rgb, rgb_to_chw
from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.online.keyframes import KeyframeStore

Predict = Callable[[np.ndarray], np.ndarray]


class NonFiniteOutputError(ValueError):
    """The model's depth has NaN or inf pixels on a keyframe."""


def evaluate_against_teacher(model_predict: Predict, store: KeyframeStore, keys: list[str]) -> float:
    """Mean per-frame AbsRel of ``model_predict(rgb)`` against the stored teacher output.

    NonFiniteOutputError names the first keyframe where the prediction is not finite.

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
        if not np.isfinite(pred).all():
            raise NonFiniteOutputError(f"non-finite depth on held-out keyframe {key} "
                                       f"({int((~np.isfinite(pred)).sum())} of {pred.size} pixels)")
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
    import torch

    from depthkd_core.models import load_checkpoint

    model, _, _ = load_checkpoint(path)
    model.eval()

    def predict(rgb: np.ndarray) -> np.ndarray:
        h, w = size or (max(32, round(rgb.shape[0] / 32) * 32), max(32, round(rgb.shape[1] / 32) * 32))
        x = torch.from_numpy(rgb_to_chw(resize_rgb(rgb, h, w)))[None]
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


def gate(candidate_onnx: str | Path, live_onnx: str | Path, store: KeyframeStore,
         margin: float) -> GateDecision:
    """Deploy iff the candidate's AbsRel < the live model's - margin on the held-out keys.

    Refused with a reason: no held-out keyframe with teacher depth yet, or a candidate
    whose depth is not finite there. A live model that is not finite there scores inf.
    """
    if margin < 0:
        raise ValueError(f"gate margin must be >= 0, got {margin}")
    keys = [k for k in store.holdout_keys() if store.teacher_info(k) is not None]
    if not keys:
        return GateDecision(False, float("nan"), float("nan"), margin,
                            "refused: no held-out keyframe with teacher depth yet")
    try:
        live_score = evaluate_against_teacher(_predictor(live_onnx), store, keys)
    except NonFiniteOutputError:
        live_score = float("inf")
    try:
        cand_score = evaluate_against_teacher(_predictor(candidate_onnx), store, keys)
    except NonFiniteOutputError as exc:
        return GateDecision(False, live_score, float("nan"), margin, f"refused: candidate gives {exc}")
    deploy = cand_score < live_score - margin
    verdict = "better" if deploy else "not better"
    reason = (f"candidate AbsRel {cand_score:.4f} vs live {live_score:.4f} on {len(keys)} holdout "
              f"keys: {verdict} by the margin {margin:g}")
    return GateDecision(deploy, live_score, cand_score, margin, reason)


def _predictor(path: str | Path) -> Predict:
    return OnnxDepthModel(path, providers="cpu", intra_op_num_threads=1).predict
