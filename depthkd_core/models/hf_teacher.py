"""Hugging Face depth models (transformers AutoModelForDepthEstimation) as teachers.

Loads a local folder only (``local_files_only``): no downloads. Preprocessing
follows the folder's image processor (DPTImageProcessor semantics: resize to
``size`` keeping the aspect ratio if asked, snapped to ``ensure_multiple_of``;
mean/std normalisation) but runs in torch, so gradients reach the images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .teacher_base import Teacher, freeze

LOG = logging.getLogger(__name__)

# Model types whose predicted_depth is metric even without depth_estimation_type.
METRIC_MODEL_TYPES = {"zoedepth", "glpn", "depth_pro"}
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


def _patch_size(config) -> int:
    for cfg in (config, getattr(config, "backbone_config", None)):
        size = getattr(cfg, "patch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return 32


def _snap(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


class HuggingFaceTeacher(Teacher):
    """A transformers depth-estimation model folder (config.json + weights).

    Metric if ``config.depth_estimation_type == "metric"`` or the model type is
    metric by design (ZoeDepth, GLPN, Depth Pro); otherwise it predicts
    relative inverse depth (DPT, Depth Anything): ``is_metric`` False,
    ``is_inverse`` True, and the output is returned as the model gives it.
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in Hugging Face teacher folder {folder}")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load Hugging Face depth model from {folder}: {exc}") from None
        self.module = freeze(model.to(device))
        self.name = f"{folder.name} ({config.model_type})"
        self.is_metric = (getattr(config, "depth_estimation_type", None) == "metric"
                          or config.model_type in METRIC_MODEL_TYPES)
        self.is_inverse = not self.is_metric
        if self.is_inverse:
            LOG.warning("teacher %s predicts relative inverse depth (not metric)", self.name)
        processor = None
        if (folder / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self._setup_preprocessing(processor, _patch_size(config))

    def _setup_preprocessing(self, processor, patch: int) -> None:
        mean, std = DEFAULT_MEAN, DEFAULT_STD
        self.target: tuple[int, int] | None = None
        self.keep_aspect_ratio, self.multiple = False, patch
        if processor is not None:
            if getattr(processor, "do_normalize", True):
                mean = tuple(getattr(processor, "image_mean", None) or mean)
                std = tuple(getattr(processor, "image_std", None) or std)
            else:
                mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            size = getattr(processor, "size", None)
            height, width = getattr(size, "height", None), getattr(size, "width", None)
            if isinstance(size, dict):
                height, width = size.get("height"), size.get("width")
            if height and width and getattr(processor, "do_resize", True):
                self.target = (int(height), int(width))
            self.keep_aspect_ratio = bool(getattr(processor, "keep_aspect_ratio", False))
            self.multiple = int(getattr(processor, "ensure_multiple_of", None) or patch)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _model_size(self, height: int, width: int) -> tuple[int, int]:
        """DPTImageProcessor.get_resize_output_image_size, or the input snapped
        to the patch size when the folder has no processor."""
        if self.target is None:
            return _snap(height, self.multiple), _snap(width, self.multiple)
        scale_h, scale_w = self.target[0] / height, self.target[1] / width
        if self.keep_aspect_ratio:
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return _snap(scale_h * height, self.multiple), _snap(scale_w * width, self.multiple)

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return self.module(pixel_values=(images - mean) / std).predicted_depth
