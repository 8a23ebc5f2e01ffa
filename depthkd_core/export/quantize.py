"""Static int8 quantisation of an exported depth model (ONNX Runtime's ``quantize_static``).

Weights int8 per output channel (symmetric), activations uint8 per tensor (asymmetric),
their ranges the minimum and maximum seen on calibration images; QDQ format, which
ONNX Runtime's CPU provider fuses into integer convolutions (VNNI on x86, dot-product
instructions on ARM) and TensorRT reads as explicit precision. Why it pays only on a
cut network: a MobileNet encoder is pointwise convolutions, which int8 runs about 1.5x
faster here; FastDepth's full-resolution decoder stages (5x5 depthwise, upsampling, skip
additions) are memory-bound and gain nothing, so the whole teacher quantised is no faster
than in fp32 (docs/student_history.md, items 1 and 14).

Calibration images must be the transfer set's (simulated frames for the packaged
student): they fix every activation's range, and a range fitted on evaluation frames
would be tuning on them. The check compares the int8 graph with the fp32 one it came from
on other images: ``agree_delta1`` (the share of pixels whose depths are within 1.25x of
each other) must be at least ``INT8_MIN_AGREEMENT``; a wrong calibration (ranges clipped
far below what the images give) fails it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthkd_core.export.contract import check_io_contract
from depthkd_core.runtime import create_session

# int8 against fp32 of the same network: the packaged student's cut, untrained, agrees at
# 0.99 with its fp32 graph on held-out simulated frames; a clipped calibration far lower.
INT8_MIN_AGREEMENT = 0.95


@dataclass
class QuantReport:
    """The int8 graph against the fp32 one on the check images."""

    path: Path
    size_bytes: int
    calibration_images: int
    check_images: int
    max_abs: float
    mean_rel: float
    agree_delta1: float

    @property
    def passed(self) -> bool:
        return self.agree_delta1 >= INT8_MIN_AGREEMENT

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"int8: {self.path} ({self.size_bytes / 1e6:.2f} MB), calibrated on "
                f"{self.calibration_images} image(s); against fp32 on {self.check_images}: max abs "
                f"{self.max_abs:.3g} m, mean rel {self.mean_rel:.3g}, delta1 {self.agree_delta1:.4f} "
                f"({verdict}, limit {INT8_MIN_AGREEMENT})")


def is_int8(path: str | Path) -> bool:
    """Whether the ONNX file at ``path`` quantises its activations (has QuantizeLinear)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "QuantizeLinear" for node in graph.node)


def _validate(name: str, images: np.ndarray, height: int, width: int) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1:] != (3, height, width):
        raise ValueError(f"{name} images must be (N>=1, 3, {height}, {width}) at the model's input "
                         f"size, got {images.shape}")
    if images.dtype != np.float32 or not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise ValueError(f"{name} images must be float32 RGB in [0, 1]")
    return images


def _run(session, images: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(["depth"], {"image": images[i:i + 1]})[0]
                           for i in range(len(images))])


def quantize_int8(src: str | Path, dst: str | Path, calibration: np.ndarray,
                  check: np.ndarray) -> QuantReport:
    """Write ``src`` (a depthkd export: ``image`` (B,3,H,W) -> ``depth``) quantised to int8
    at ``dst`` (atomically), its activation ranges from ``calibration`` and compared with
    ``src`` on ``check`` (both (N,3,H,W) float32 in [0,1] at the input size)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model to quantise not found: {src}")
    fp32, _ = create_session(src, "cpu")
    shape = fp32.get_inputs()[0].shape
    if not all(isinstance(d, int) for d in shape[2:]):
        raise ValueError(f"{src}: int8 calibration needs a fixed input size, the graph has {shape}")
    height, width = shape[2:]
    calibration = _validate("calibration", calibration, height, width)
    check = _validate("check", check, height, width)

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self.next = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.next == len(calibration):
                return None
            self.next += 1
            return {"image": calibration[self.next - 1:self.next]}

    dynamic_batch = isinstance(shape[0], str)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix="depthkd-int8-") as work:
            prepared = Path(work) / "prepared.onnx"
            # the symbolic pass cannot type torch.export's shape ops; ONNX's own inference can
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(tmp), Frames(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        check_io_contract(tmp, height, width, dynamic_batch)
        int8, _ = create_session(tmp, "cpu")
        ref, got = _run(fp32, check).astype(np.float64), _run(int8, check).astype(np.float64)
        if not np.isfinite(got).all():
            raise ValueError(f"{src}: the int8 graph gives non-finite depth on the check images")
        valid = (ref > 0) & (got > 0)
        ratio = np.maximum(got[valid] / ref[valid], ref[valid] / got[valid])
        report = QuantReport(path=dst, size_bytes=tmp.stat().st_size,
                             calibration_images=len(calibration), check_images=len(check),
                             max_abs=float(np.max(np.abs(got - ref))),
                             mean_rel=float(np.mean(np.abs(got[valid] - ref[valid]) / ref[valid])),
                             agree_delta1=float(np.mean(ratio < 1.25)) if ratio.size else 0.0)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    print(report.summary())
    return report
