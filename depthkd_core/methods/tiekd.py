"""``tiekd``: TIE-KD (Choi et al., METHODS.md s.4).

``L = alpha * KL(P^T || P^S) + (1 - alpha) * (1 - SSIM(d^S, d^T)) / 2``: the
teacher's depth becomes a Gaussian depth-probability map over the student's K
fixed bin centres (``depthkd_core.losses.dpm_kl``); the student needs the
K-bin DPM head (``model.head: dpm``). Only the teacher's depth output is used,
so any metric teacher works (checkpoint, TorchScript, ONNX, Hugging Face).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from depthkd_core.losses.dpm_kl import DPMKLDivergence
from depthkd_core.losses.ssim import SSIMLoss
from depthkd_core.methods.base import METHODS
from depthkd_core.methods.base import DistillMethod
from depthkd_core.methods.config import DistillConfig
from depthkd_core.models import Teacher


@dataclass
class TiekdConfig:
    """alpha: weight of the DPM KL against the SSIM term; sigma: DPM standard deviation
    (metres). Both are the paper's swept hyper-parameters (its Figs. 4-5); their
    chosen values were lost in the extracted text, so 0.5 / 0.5 here.
    ssim_window: SSIM Gaussian window (Wang et al.'s 11)."""

    alpha: float = 0.5
    sigma: float = 0.5
    ssim_window: int = 11

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"tiekd alpha must be in [0, 1], got {self.alpha}")
        if self.sigma <= 0:
            raise ValueError(f"tiekd sigma must be > 0, got {self.sigma}")


@METHODS.register("tiekd")
class Tiekd(DistillMethod):
    """Student with a DPM head learns the teacher's Gaussian DPM (KL) and depth structure (SSIM)."""

    Config = TiekdConfig

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__(teacher, student, cfg)
        if cfg.model.head != "dpm":
            raise ValueError(f"tiekd needs a student with the K-bin depth-probability head: set "
                             f"model.head: dpm (with model.num_bins, model.bin_layout); got "
                             f"head '{cfg.model.head}'")
        if not teacher.is_metric:
            raise ValueError(f"tiekd needs a metric teacher (its DPM is over metric bin centres); "
                             f"teacher '{teacher.name}' predicts relative depth: use labelfree")
        self.kl = DPMKLDivergence(self.options.sigma)
        self.ssim = SSIMLoss(self.options.ssim_window, max_val=cfg.model.max_depth)

    def step(self, student: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        if isinstance(student, DistributedDataParallel):
            # forward_dict bypasses DDP's forward, whose hooks synchronise the gradients
            raise ValueError("tiekd reads the student's DPM via forward_dict, which DDP does not "
                             "wrap: run it in one process (no torchrun)")
        images = batch["image"]
        target = self.teacher_depth(images)
        out = student.forward_dict(images)
        valid = target > 0
        kl = self.kl(out["probs"], out["bin_centers"], target, valid)
        ssim = self.ssim(out["depth"], target, valid)
        alpha = self.options.alpha
        return {"loss": alpha * kl + (1.0 - alpha) * ssim, "dpm_kl": kl, "ssim": ssim}
