"""Validation gate and the versioned model registry the live depth node reads.

The gate scores a candidate checkpoint (torch) and the live ONNX model (onnxruntime) by
AbsRel against the stored teacher depth on held-out keyframes, and deploys only when
``candidate_abs_rel < live_abs_rel - margin`` (margin absolute, in AbsRel units).
``ModelRegistry`` exports to ONNX, requires parity, publishes ``vNNNN.onnx`` atomically and
keeps the earlier versions for ``rollback`` (docs/online.md).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from depthkd_core.atomic import atomic_open
from depthkd_core.evaluate.metrics import compute_depth_metrics
from depthkd_core.export.onnx_export import export_onnx
from depthkd_core.export.runtime import OnnxDepthModel
from depthkd_core.models import load_checkpoint
from depthkd_core.online.keyframes import KeyframeStore

Predict = Callable[[np.ndarray], np.ndarray]
STATE = "current.json"


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


class DeployError(RuntimeError):
    """Export or parity failed: nothing was published."""


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=1)


class ModelRegistry:
    """Versions ``models_dir/v0001.onnx, v0002.onnx, ...`` and ``current.json``.

    current.json: ``{"stack": [{"version", "file", "source", "time"}...], "next": int}``; the
    last stack entry is current, the one before it previous. ``rollback`` pops the current
    entry; version numbers are never reused. The stack holds the last ``keep`` versions and
    version files outside it (rolled back or too old) are deleted, so disk use is bounded.
    """

    def __init__(self, models_dir: str | Path, keep: int = 5) -> None:
        if keep < 2:
            raise ValueError(f"ModelRegistry keep must be >= 2 (current and previous), got {keep}")
        self.dir, self.keep = Path(models_dir), keep
        self.dir.mkdir(parents=True, exist_ok=True)
        staging = self.dir / ".staging"
        if staging.is_dir():  # a deploy that died mid-export
            shutil.rmtree(staging)

    def state(self) -> dict[str, Any]:
        path = self.dir / STATE
        return json.loads(path.read_text()) if path.is_file() else {"stack": [], "next": 1}

    def _entry(self, offset: int) -> Path | None:
        stack = self.state()["stack"]
        return self.dir / stack[-offset]["file"] if len(stack) >= offset else None

    def current(self) -> Path | None:
        return self._entry(1)

    def previous(self) -> Path | None:
        return self._entry(2)

    def version(self) -> int | None:
        stack = self.state()["stack"]
        return int(stack[-1]["version"]) if stack else None

    def deploy(self, candidate_ckpt: str | Path, height: int, width: int) -> Path:
        """Export the checkpoint, require parity, publish it as the next version; DeployError if not.

        A model that fixes its own run size (``ModelConfig.input_size``, e.g. a fastdepth
        student) is exported at that size, not at ``height`` x ``width``: any other size
        would put a resize into the graph."""
        model, model_cfg, _ = load_checkpoint(candidate_ckpt)
        height, width = model_cfg.input_size or (height, width)
        state = self.state()
        version = int(state["next"])
        name = f"v{version:04d}.onnx"
        staging = self.dir / ".staging"
        staging.mkdir(exist_ok=True)
        try:
            report = export_onnx(model, staging / name, height, width)
            if not report.passed:
                raise DeployError(f"{candidate_ckpt}: ONNX parity failed ({report.summary()})")
            with open(staging / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staging / name, self.dir / name)
        except DeployError:
            raise
        except Exception as exc:  # any exporter failure means no deploy
            raise DeployError(f"{candidate_ckpt}: ONNX export failed: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        entry = {"version": version, "file": name, "source": str(candidate_ckpt), "time": time.time()}
        self._publish({"stack": [*state["stack"], entry], "next": version + 1})
        return self.dir / name

    def rollback(self) -> Path:
        """Make the previous version current again; ValueError when there is none."""
        state = self.state()
        if len(state["stack"]) < 2:
            raise ValueError(f"{self.dir}: no previous model version to roll back to")
        self._publish({**state, "stack": state["stack"][:-1]})
        return self.dir / state["stack"][-2]["file"]

    def _publish(self, state: dict[str, Any]) -> None:
        """Write current.json atomically, then delete version files the stack no longer holds."""
        state = {**state, "stack": state["stack"][-self.keep:]}
        _write_json_atomic(self.dir / STATE, state)
        kept = {entry["file"] for entry in state["stack"]}
        for path in self.dir.glob("v*.onnx"):
            if path.name not in kept:
                path.unlink(missing_ok=True)
