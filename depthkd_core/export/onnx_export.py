"""Export a depth model to ONNX and check it against PyTorch (`depthkd export`).

The graph takes ``image`` (B,3,H,W) float32 RGB in [0,1] and returns ``depth``
(B,1,H,W) float32 metres, with a dynamic batch axis. It is traced with the
``torch.export``-based exporter (``dynamo=True``; the TorchScript exporter is
deprecated in torch 2.9+). That exporter emits opset 18 and converts down with
onnx's version converter when a lower opset (default 17) is asked for.

Parity criterion: ``max_rel = max|onnx - torch| / max|torch|``, the largest
absolute error relative to the depth scale of the PyTorch output, on a seeded
random batch and on any real images given. It must be <= 1e-4 for fp32 and
<= 1e-2 for fp16 (weights and activations in half precision, I/O float32).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from depthkd_core.export.contract import check_io_contract, images_to_batch
from depthkd_core.runtime import create_session

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2
MIN_OPSET = 17
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ParityReport:
    """ONNX vs PyTorch agreement; ``max_*`` is the worst over random and real inputs."""

    path: Path
    size_bytes: int
    max_abs: float
    max_rel: float
    random_max_abs: float
    random_max_rel: float
    real_max_abs: float | None
    real_max_rel: float | None
    num_real: int
    fp16: bool
    provider: str

    @property
    def tolerance(self) -> float:
        return FP16_TOLERANCE if self.fp16 else FP32_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    def summary(self) -> str:
        lines = [f"onnx: {self.path} ({self.size_bytes / 1e6:.2f} MB, "
                 f"{'fp16' if self.fp16 else 'fp32'}, {self.provider})",
                 f"random input: max abs {self.random_max_abs:.3g} m, max rel {self.random_max_rel:.3g}"]
        if self.num_real:
            lines.append(f"{self.num_real} real image(s): max abs {self.real_max_abs:.3g} m, "
                         f"max rel {self.real_max_rel:.3g}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"parity {verdict}: max rel {self.max_rel:.3g} "
                     f"(limit {self.tolerance:g}, max|onnx - torch| / max|torch|)")
        return "\n".join(lines)


class _HalfPrecision(nn.Module):
    """Runs ``model`` in float16 behind float32 input and output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.half()).float()


def _compare(model: nn.Module, session, x: np.ndarray, batched: bool) -> tuple[float, float]:
    """(max abs, max rel) error of the ONNX session against ``model`` on ``x``."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    chunks = [x] if batched else [x[i:i + 1] for i in range(len(x))]
    got = np.concatenate([session.run(["depth"], {"image": c})[0] for c in chunks])
    if got.shape != ref.shape:
        raise ValueError(f"ONNX output shape {got.shape} != PyTorch output shape {ref.shape}")
    max_abs = float(np.max(np.abs(got.astype(np.float64) - ref)))
    return max_abs, max_abs / max(float(np.max(np.abs(ref))), 1e-12)


def export_onnx(model: nn.Module, path: str | Path, height: int, width: int, opset: int = 17,
                fp16: bool = False, check_images: list[np.ndarray] | None = None,
                dynamic_batch: bool = True) -> ParityReport:
    """Export ``model`` to ``path`` (atomically), check the graph and PyTorch parity.

    The file is written whenever the graph is valid; ``report.passed`` says
    whether parity is within tolerance (the CLI fails when it is not).
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (the exporter emits 18 and converts down), got {opset}")
    real = images_to_batch(check_images, height, width) if check_images else None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = copy.deepcopy(model).float().cpu().eval()
    net = _HalfPrecision(copy.deepcopy(reference)).eval() if fp16 else reference
    example = torch.rand(2 if dynamic_batch else 1, 3, height, width)
    # batch 2 in the example: torch.export specialises a dimension of size 1
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.onnx.export(net, (example,), str(tmp), input_names=["image"], output_names=["depth"],
                          opset_version=opset, dynamo=True, dynamic_shapes=shapes,
                          external_data=False, verbose=False)
        check_io_contract(tmp, height, width, dynamic_batch)
        session, provider = create_session(tmp, "cpu")
        x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)).numpy()
        rand_abs, rand_rel = _compare(reference, session, x, dynamic_batch)
        real_abs = real_rel = None
        if real is not None:
            real_abs, real_rel = _compare(reference, session, real, dynamic_batch)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    report = ParityReport(path=path, size_bytes=path.stat().st_size,
                          max_abs=max(rand_abs, real_abs or 0.0), max_rel=max(rand_rel, real_rel or 0.0),
                          random_max_abs=rand_abs, random_max_rel=rand_rel, real_max_abs=real_abs,
                          real_max_rel=real_rel, num_real=len(check_images or []), fp16=fp16,
                          provider=provider)
    print(report.summary())
    return report


def read_images(folder: str | Path, limit: int = 8) -> list[np.ndarray]:
    """The first ``limit`` PNG/JPEG images of ``folder`` (sorted), as uint8 RGB."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"check-images folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {folder}")
    images = []
    for file in files:
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {file}")
        images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return images


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="depthkd checkpoint (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--height", type=int, required=True, help="input height (multiple of 32)")
    parser.add_argument("--width", type=int, required=True, help="input width (multiple of 32)")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--fp16", action="store_true", help="half-precision weights and activations")
    parser.add_argument("--check-images", type=Path, default=None,
                        help="folder of real RGB images (first 8) also used for the parity check")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size to 1")
    parser.add_argument("--int8", type=Path, default=None, metavar="FOLDER",
                        help="also quantise to int8 (export/quantize.py), activation ranges from the "
                             "first --int8-frames images of FOLDER (the training images, never "
                             "evaluation frames): --out is the int8 graph, <out>_fp32.onnx the fp32 one")
    parser.add_argument("--int8-frames", type=int, default=64, help="calibration images (default 64)")


def run_cli(args: argparse.Namespace) -> int:
    from depthkd_core.models import load_checkpoint

    if args.int8 is not None and (args.fp16 or args.int8_frames < 1):
        raise ValueError("--int8 quantises an fp32 graph (not with --fp16) on --int8-frames >= 1 images")
    model, _, _ = load_checkpoint(args.checkpoint)
    images = read_images(args.check_images) if args.check_images is not None else None
    calibration = read_images(args.int8, args.int8_frames) if args.int8 is not None else None
    fp32 = args.out.with_name(f"{args.out.stem}_fp32.onnx") if calibration else args.out
    report = export_onnx(model, fp32, args.height, args.width, opset=args.opset, fp16=args.fp16,
                         check_images=images, dynamic_batch=not args.static_batch)
    if not report.passed:
        print(f"depthkd export: error: ONNX output differs from PyTorch by max rel {report.max_rel:.3g} "
              f"> {report.tolerance:g} (max|onnx - torch| / max|torch|); {fp32} was written "
              "for inspection but should not be deployed", file=sys.stderr)
        return 1
    if calibration:
        from depthkd_core.export.quantize import quantize_int8

        batch = images_to_batch(calibration, args.height, args.width)
        quant = quantize_int8(fp32, args.out, batch,
                              images_to_batch(images, args.height, args.width) if images else batch)
        if not quant.passed:
            print(f"depthkd export: error: the int8 graph disagrees with the fp32 one ({quant.summary()}); "
                  f"{args.out} was written for inspection but should not be deployed", file=sys.stderr)
            return 1
    return 0
