"""A relative-depth teacher for the label-free rows of `depthkd bench`.

Gao et al. distil from relative foundation models (MiDaS, Depth Anything) whose
output is affine-invariant disparity. No such model can be downloaded here, so
the benchmark makes one from its own metric teacher: an ONNX file predicting
``(1/d - mean) / std`` per image. The label-free rows then see exactly what a
MiDaS-style ONNX export gives them (no scale, no shift, no gradients), and the
teacher's knowledge is the same as in the metric rows, so the rows compare losses,
not teachers.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from depthkd_core.export.onnx_export import ParityReport, export_onnx
from depthkd_core.models import load_checkpoint

# load_teacher(path, output=RELATIVE_OUTPUT) opens the exported file as what it is.
RELATIVE_OUTPUT = "relative_inverse"


class RelativeDisparity(nn.Module):
    """Wraps a metric depth net: per image, disparity standardised to zero mean, unit std."""

    def __init__(self, depth_net: nn.Module, eps: float = 1e-6) -> None:
        super().__init__()
        self.depth_net, self.eps = depth_net, eps

    def forward(self, images: Tensor) -> Tensor:
        disparity = 1.0 / self.depth_net(images).clamp(min=self.eps)
        flat = disparity.flatten(1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = flat.std(dim=1).view(-1, 1, 1, 1).clamp(min=self.eps)
        return (disparity - mean) / std


def export_relative_teacher(checkpoint: str | Path, path: str | Path, height: int,
                            width: int) -> ParityReport:
    """ONNX of the checkpoint's relative disparity at ``height`` x ``width`` (parity-checked)."""
    model, _, _ = load_checkpoint(checkpoint)
    report = export_onnx(RelativeDisparity(model.eval()), path, height, width)
    if not report.passed:
        raise RuntimeError(f"relative teacher export {path} failed parity: {report.summary()}")
    return report
