"""One on-robot fine-tuning round: the student learns from the stored teacher depths (no network).

The registered label-free methods (``labelfree``: CWD + geometric, Gao et al.; ``tiekd``:
DPM KL + SSIM, Choi et al.) run unchanged inside the shared ``Trainer``: a
``StoredTeacher`` stands in for the teacher and returns the teacher depth that the
``StoredTeacherDataset`` put into each batch. The round's data is snapshotted into
``work_dir/round_data.npz`` when it starts, so a resumed round (after a kill) sees the
same frames in the same order even while the store keeps changing.

With ``--live ONNX`` the process also exports the round's checkpoint to
``work_dir/candidate.onnx`` (parity checked) and runs the gate (``online.gate``) of that
ONNX against the live one, so torch never runs in the node, and the gate judges the file
that would go live, in the runtime that would run it.

    python -m depthkd_core.online.finetune --store DIR --init CKPT --work DIR [--config YAML]
        [--lock FILE] [--live ONNX --margin M --export H W] [--lr-scale S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from depthkd_core.atomic import atomic_open
from depthkd_core.config import load_config
from depthkd_core.imaging import resize_rgb, rgb_to_chw
from depthkd_core.methods import METHODS
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher, load_checkpoint
from depthkd_core.online.keyframes import KeyframeStore
from depthkd_core.online.rounds import LOCKED_EXIT, LockBusyError, hold_lock
from depthkd_core.train.config import DataConfig, OptimConfig
from depthkd_core.train.trainer import Trainer, checkpoints, seed_everything

SNAPSHOT = "round_data.npz"
DONE = "round.json"
CANDIDATE = "candidate.onnx"


@dataclass
class FinetuneConfig:
    """One round. margin: the gate's absolute AbsRel margin (gate.py). ckpt_every: steps
    between resumable checkpoints. method_kwargs: the method's own options (docs/distill.md).
    int8_calibration_frames: when the live student is an int8 graph, the candidate is
    quantised too, its activation ranges from this many train keyframes (evenly spaced)."""

    method: str = "labelfree"
    steps_per_round: int = 50
    lr: float = 1e-4
    batch_size: int = 4
    height: int = 192
    width: int = 256
    margin: float = 0.02
    seed: int = 0
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    ckpt_every: int = 10
    int8_calibration_frames: int = 64

    def __post_init__(self) -> None:
        if self.method not in ("labelfree", "tiekd"):
            raise ValueError(f"online method must be 'labelfree' or 'tiekd', got '{self.method}'")
        if self.steps_per_round < 1 or self.batch_size < 1 or self.lr <= 0 or self.ckpt_every < 1:
            raise ValueError(f"need steps_per_round, batch_size, ckpt_every >= 1 and lr > 0; got "
                             f"{self.steps_per_round}, {self.batch_size}, {self.ckpt_every}, {self.lr}")
        if self.height % 32 or self.width % 32 or min(self.height, self.width) < 32:
            raise ValueError(f"height/width must be positive multiples of 32, got {self.height}x{self.width}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.int8_calibration_frames < 1:
            raise ValueError(f"int8_calibration_frames must be >= 1, got {self.int8_calibration_frames}")


@dataclass
class RoundResult:
    checkpoint: Path
    steps: int
    loss: float


class StoredTeacher(Teacher):
    """A Teacher whose output is the stored depth of the current batch (``serve`` sets it)."""

    differentiable = False

    def __init__(self, is_metric: bool, is_inverse: bool) -> None:
        self.name, self.is_metric, self.is_inverse = "stored", is_metric, is_inverse
        self._target: Tensor | None = None

    def serve(self, depth: Tensor) -> None:
        self._target = depth

    def __call__(self, images: Tensor) -> Tensor:
        self._check(images)
        target = self._target
        if target is None or target.shape[0] != images.shape[0] or target.shape[-2:] != images.shape[-2:]:
            got = None if target is None else tuple(target.shape)
            raise ValueError(f"stored teacher: no depth served for images {tuple(images.shape)} (served {got})")
        return target


class StoredTeacherDataset(Dataset):
    """Keyframes with their teacher depth: image (3,H,W) [0,1], teacher (1,H,W), intrinsics (4,)."""

    def __init__(self, images: np.ndarray, teacher: np.ndarray, intrinsics: np.ndarray) -> None:
        if not len(images) == len(teacher) == len(intrinsics):
            raise ValueError(f"snapshot arrays disagree: {len(images)} images, {len(teacher)} "
                             f"teacher maps, {len(intrinsics)} intrinsics")
        self.images, self.teacher, self.intrinsics = images, teacher, intrinsics

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = torch.from_numpy(rgb_to_chw(self.images[index]))
        return {"image": image, "teacher": torch.from_numpy(self.teacher[index]),
                "intrinsics": torch.from_numpy(self.intrinsics[index])}


def snapshot_store(store: KeyframeStore, keys: list[str], height: int, width: int) -> dict[str, Any]:
    """Keyframes resized to HxW with their teacher depths; keys evicted meanwhile are skipped."""
    images, depths, intr, kept, modes = [], [], [], [], set()
    for key in keys:
        try:
            depth, info, frame = store.teacher_depth(key), store.teacher_info(key), store.load(key)
        except FileNotFoundError:
            continue
        if depth is None or info is None:
            continue
        modes.add((info["is_metric"], info["is_inverse"]))
        images.append(resize_rgb(frame.rgb, height, width))  # as the live node resizes
        depth = np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        depths.append(cv2.resize(depth, (width, height), interpolation=cv2.INTER_LINEAR)[None])
        intr.append(np.asarray(frame.intrinsics.scaled(width, height).as_tuple(), np.float32))
        kept.append(key)
    if len(modes) > 1:
        raise ValueError(f"store {store.root} mixes teacher kinds (is_metric, is_inverse) {sorted(modes)}")
    is_metric, is_inverse = modes.pop() if modes else (True, False)
    return {"keys": np.asarray(kept), "images": np.asarray(images, np.uint8).reshape(-1, height, width, 3),
            "teacher": np.asarray(depths, np.float32).reshape(-1, 1, height, width),
            "intrinsics": np.asarray(intr, np.float32).reshape(-1, 4),
            "is_metric": np.asarray(is_metric), "is_inverse": np.asarray(is_inverse)}


def _round_data(store_root: Path, work_dir: Path, cfg: FinetuneConfig) -> dict[str, np.ndarray]:
    path = work_dir / SNAPSHOT
    if not path.is_file():
        store = KeyframeStore(store_root, writer=False)
        data = snapshot_store(store, store.train_keys(), cfg.height, cfg.width)
        with atomic_open(path) as handle:
            np.savez(handle, **data)
    with np.load(path, allow_pickle=False) as loaded:
        return {k: loaded[k] for k in loaded.files}


def _distill_config(store_root: Path, work_dir: Path, cfg: FinetuneConfig, model_cfg: Any,
                    batch_size: int, resume: bool) -> DistillConfig:
    return DistillConfig(
        data=DataConfig(root=str(store_root), reader="keyframes", height=cfg.height, width=cfg.width,
                        augment=False),
        model=model_cfg,
        optim=OptimConfig(optimizer="adam", lr=cfg.lr, weight_decay=0.0, batch_size=batch_size,
                          scheduler="none"),
        max_steps=cfg.steps_per_round, log_every=10, ckpt_every=cfg.ckpt_every, keep_checkpoints=2,
        out_dir=str(work_dir), seed=cfg.seed, resume=resume, teacher=f"stored:{store_root}",
        method=cfg.method, method_kwargs=dict(cfg.method_kwargs))


def run_round(store_root: str | Path, init_checkpoint: str | Path, work_dir: str | Path,
              cfg: FinetuneConfig) -> RoundResult:
    """Fine-tune the student on the store's train keys; resumes from work_dir's latest checkpoint.

    A finished round (``work_dir/round.json``) is returned as it is, without training.
    loss: mean of the method's loss over the last (up to 10) steps this call ran (NaN if none).
    """
    store_root, work_dir = Path(store_root), Path(work_dir)
    done = work_dir / DONE
    if done.is_file():
        saved = json.loads(done.read_text())
        return RoundResult(Path(saved["checkpoint"]), int(saved["steps"]), float(saved["loss"]))
    work_dir.mkdir(parents=True, exist_ok=True)
    found = checkpoints(work_dir)
    if not found and not Path(init_checkpoint).is_file():
        raise FileNotFoundError(f"initial student checkpoint {init_checkpoint} not found")
    student, model_cfg, _ = load_checkpoint(found[-1] if found else init_checkpoint)
    data = _round_data(store_root, work_dir, cfg)
    count = len(data["keys"])
    if count < cfg.batch_size:
        raise ValueError(f"store {store_root} has {count} train keyframes with teacher depth; "
                         f"a round needs at least batch_size = {cfg.batch_size}")
    dcfg = _distill_config(store_root, work_dir, cfg, model_cfg, cfg.batch_size, bool(found))
    seed_everything(cfg.seed)
    teacher = StoredTeacher(bool(data["is_metric"]), bool(data["is_inverse"]))
    method = METHODS.get(cfg.method)(teacher, student, dcfg)
    recent: deque[float] = deque(maxlen=10)  # a resumed round reports the steps it ran itself

    def step(model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher.serve(batch["teacher"])
        out = method.step(model, batch)
        recent.append(float(out["loss"].detach()))
        return out

    dataset = StoredTeacherDataset(data["images"], data["teacher"], data["intrinsics"])
    final = Trainer(student, step, dataset, dcfg, extra_optimizers=method.extra_optimizers(),
                    extra_modules=method.extra_modules()).fit()
    result = RoundResult(final, cfg.steps_per_round, float(np.mean(recent)) if recent else float("nan"))
    with atomic_open(done, "w") as handle:
        handle.write(json.dumps({**asdict(result), "checkpoint": str(final)}))
    return result


def export_candidate(checkpoint: str | Path, path: Path, height: int, width: int,
                     calibration: list[np.ndarray] | None = None) -> str:
    """Export ``checkpoint`` to ``path`` (atomically); "" on success, else why it failed.

    A model that fixes its own run size (``ModelConfig.input_size``, e.g. a fastdepth
    student) is exported at that size: any other would put a resize into the graph.
    ``calibration`` (RGB frames): the candidate is quantised to int8 on them, as the live
    student is when it is an int8 graph (export/quantize.py)."""
    from depthkd_core.export.contract import images_to_batch
    from depthkd_core.export.onnx_export import export_onnx
    from depthkd_core.export.quantize import quantize_int8

    if path.is_file():  # a resumed round exported already
        return ""
    model, model_cfg, _ = load_checkpoint(checkpoint)
    height, width = model_cfg.input_size or (height, width)
    tmp, fp32 = (path.with_name(f".{path.name}.{part}.tmp") for part in ("out", "fp32"))
    try:
        report = export_onnx(model, fp32, height, width)
        if not report.passed:
            return f"ONNX parity failed ({report.summary()})"
        if calibration:
            batch = images_to_batch(calibration, height, width)
            quant = quantize_int8(fp32, tmp, batch, batch)
            if not quant.passed:
                return f"int8 check failed ({quant.summary()})"
        else:
            os.replace(fp32, tmp)
        os.replace(tmp, path)
    except Exception as exc:  # any exporter failure means no candidate
        return f"ONNX export failed: {exc}"
    finally:
        tmp.unlink(missing_ok=True)
        fp32.unlink(missing_ok=True)
    return ""


def store_calibration(store: KeyframeStore, frames: int) -> list[np.ndarray]:
    """Up to ``frames`` of the store's train keyframes, evenly spaced: an int8 candidate's
    calibration images (the camera's own frames, never the held-out ones that gate it)."""
    keys = store.train_keys()
    picks = np.linspace(0, len(keys) - 1, min(frames, len(keys))).round().astype(int) if keys else []
    return [store.load(keys[int(i)]).rgb for i in picks]


def judge(store_root: Path, result: RoundResult, work_dir: Path, live: Path, margin: float,
          size: tuple[int, int], calibration_frames: int = 64) -> dict[str, Any]:
    """Export the round's checkpoint and gate it against ``live``: the result line's gate part.
    An int8 live student gets an int8 candidate (calibrated on ``calibration_frames`` train
    keyframes): both are judged, and the winner runs, at the speed the robot ships."""
    from depthkd_core.export.quantize import is_int8
    from depthkd_core.online.gate import gate

    candidate = work_dir / CANDIDATE
    store = KeyframeStore(store_root, writer=False)
    calibration = store_calibration(store, calibration_frames) if is_int8(live) else None
    failure = export_candidate(result.checkpoint, candidate, *size, calibration=calibration)
    if failure:
        return {"onnx": None, "gate": {"deploy": False, "live_abs_rel": None,
                                       "candidate_abs_rel": None, "margin": margin,
                                       "reason": f"candidate refused: {failure}"}}
    decision = asdict(gate(candidate, live, store, margin))
    for key in ("live_abs_rel", "candidate_abs_rel"):  # JSON has no NaN or inf: null
        decision[key] = decision[key] if np.isfinite(decision[key]) else None
    return {"onnx": str(candidate), "gate": decision, "int8": calibration is not None}


def main(argv: list[str] | None = None) -> int:
    """Run one round in this process and print its RoundResult (and gate) as JSON."""
    parser = argparse.ArgumentParser(prog="python -m depthkd_core.online.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="keyframe store root")
    parser.add_argument("--init", required=True, help="student checkpoint to start from")
    parser.add_argument("--work", required=True, help="this round's folder (resumed if it has checkpoints)")
    parser.add_argument("--config", default=None, help="YAML with FinetuneConfig fields")
    parser.add_argument("--lock", default=None, help="trainer lock file: exit 75 when another "
                        "trainer holds it")
    parser.add_argument("--live", default=None, help="live ONNX: export and gate the result")
    parser.add_argument("--margin", type=float, default=None, help="gate margin (default: config's)")
    parser.add_argument("--export", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="ONNX export size (default: config's height and width)")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="multiplies the config's learning rate (the supervisor lowers it "
                        "after refused rounds)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps_per_round=20")
    args = parser.parse_args(argv)
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if not 0.0 < args.lr_scale <= 1.0:
        parser.error(f"--lr-scale must be in (0, 1], got {args.lr_scale}")
    cfg = replace(cfg, lr=cfg.lr * args.lr_scale)
    if args.lock:
        try:
            lock = hold_lock(Path(args.lock))  # noqa: F841 - held until this process ends
        except LockBusyError as exc:
            print(f"not started: {exc}", file=sys.stderr)
            return LOCKED_EXIT
    result = run_round(args.store, args.init, args.work, cfg)
    line: dict[str, Any] = {**asdict(result), "checkpoint": str(result.checkpoint)}
    if args.live:
        margin = cfg.margin if args.margin is None else args.margin
        line.update(judge(Path(args.store), result, Path(args.work), Path(args.live), margin,
                          tuple(args.export or (cfg.height, cfg.width)), cfg.int8_calibration_frames))
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
