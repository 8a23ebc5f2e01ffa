"""timm feature encoders returning an NCHW pyramid (strides up to 32).

CNNs use timm ``features_only`` as is. Swin returns NHWC features (permuted
here) and is built with ``dynamic_img_size`` so any multiple of 32 works and
it still exports to ONNX. A plain ViT has one stride (16); its four taken
blocks are resampled to strides 4/8/16/32 as in DPT's reassemble stage
(Ranftl et al., 2021), and it keeps a fixed ``img_size`` because timm's
dynamic position-embedding resampling (antialiased bicubic) has no ONNX op.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

# Blocks a plain ViT hands to the decoder (DPT takes 2,5,8,11 of 12 blocks).
VIT_TAKE = (-10, -7, -4, -1)


def _family(name: str) -> str:
    module = timm.models.model_entrypoint(name).__module__
    if "swin" in module:
        return "swin"
    if "vision_transformer" in module:
        return "vit"
    return "cnn"


def timm_kwargs(name: str, input_size: tuple[int, int] | None) -> dict:
    """Construction kwargs (besides features_only) for timm model ``name``."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm encoder '{name}'")
    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None or not pcfg.fixed_input_size:
        return {}
    size = input_size or tuple(pcfg.input_size[-2:])
    kwargs: dict = {"img_size": size}
    family = _family(name)
    if family == "swin":
        kwargs["dynamic_img_size"] = True
    elif family == "vit":
        kwargs["out_indices"] = VIT_TAKE
    return kwargs


def _check_pretrained(name: str, kwargs: dict, path: Path) -> None:
    """Strictly match the file against the full timm model (features_only alone
    would silently drop unexpected keys)."""
    full_kwargs = {k: v for k, v in kwargs.items() if k != "out_indices"}
    full = timm.create_model(name, pretrained=False, **full_kwargs)
    state = timm.models.load_state_dict(str(path), weights_only=True)
    try:
        result = full.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"pretrained weights {path} do not fit encoder '{name}': {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"pretrained weights {path} do not fit encoder '{name}': "
            f"{len(result.missing_keys)} missing keys {result.missing_keys[:8]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:8]}")


def _create(name: str, input_size: tuple[int, int] | None, pretrained: str | None) -> nn.Module:
    kwargs = timm_kwargs(name, input_size)
    if pretrained is None:
        return timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained encoder weights not found: {path}")
    _check_pretrained(name, kwargs, path)
    # A local file overlay: timm maps the classifier checkpoint onto the feature net.
    return timm.create_model(name, pretrained=True, features_only=True,
                             pretrained_cfg_overlay={"file": str(path)}, **kwargs)


class Reassemble(nn.Module):
    """Single-stride ViT features -> strides 4, 8, 16, 32 (DPT reassemble)."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        if stride != 16:
            raise ValueError(f"ViT encoders need patch stride 16, got {stride}")
        outs = [channels // 4, channels // 2, channels, channels]
        self.channels = outs
        self.resample = nn.ModuleList([
            nn.ConvTranspose2d(channels, outs[0], 4, stride=4),
            nn.ConvTranspose2d(channels, outs[1], 2, stride=2),
            nn.Conv2d(channels, outs[2], 1),
            nn.Conv2d(channels, outs[3], 3, stride=2, padding=1),
        ])

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(f) for layer, f in zip(self.resample, feats)]


class TimmEncoder(nn.Module):
    """timm backbone as a list of NCHW features with ``channels``/``reductions``."""

    def __init__(self, name: str, input_size: tuple[int, int] | None = None,
                 pretrained: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.body = _create(name, input_size, pretrained)
        fmt = getattr(self.body, "output_fmt", "NCHW")
        self.nhwc = getattr(fmt, "value", fmt) == "NHWC"
        channels = list(self.body.feature_info.channels())
        reductions = list(self.body.feature_info.reduction())
        self.fixed_size: tuple[int, int] | None = None
        self.reassemble: Reassemble | None = None
        if len(set(reductions)) == 1:
            self.reassemble = Reassemble(channels[0], reductions[0])
            channels, reductions = self.reassemble.channels, [4, 8, 16, 32]
            self.fixed_size = tuple(timm_kwargs(name, input_size)["img_size"])
        self.channels: list[int] = channels
        self.reductions: list[int] = reductions

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = list(self.body(x))
        if self.nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        if self.reassemble is not None:
            feats = self.reassemble(feats)
        return feats
