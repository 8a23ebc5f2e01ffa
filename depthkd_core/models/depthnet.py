"""DepthNet = timm encoder + decoder + depth head; registry ``MODELS``."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .config import ModelConfig
from .decoders import StudentDecoder, UNetDecoder
from .encoders import TimmEncoder
from .heads import build_head, expected_depth
from .lgconv import insert_lgconv

MODELS: Registry[Callable[[ModelConfig], "DepthNet"]] = Registry("model")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DepthNet(nn.Module):
    """RGB in [0,1] (B,3,H,W) -> metric depth (B,1,H,W) at the input size.

    ImageNet normalisation happens inside ``forward`` so an exported model
    takes [0,1] RGB directly. H and W must be multiples of the encoder's
    deepest stride (32); ViT encoders need exactly ``cfg.input_size``.
    """

    def __init__(self, cfg: ModelConfig, encoder: TimmEncoder, decoder: nn.Module,
                 head: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder, self.head = encoder, decoder, head
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DepthNet expects images (B,3,H,W), got shape {tuple(x.shape)}")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        fixed = self.encoder.fixed_size
        if fixed is not None and size != fixed:
            raise ValueError(f"encoder '{self.cfg.encoder}' takes exactly {fixed}, got {size}")
        stride = self.encoder.reductions[-1]
        if size[0] % stride or size[1] % stride:
            raise ValueError(f"image size {size} is not a multiple of {stride}")

    def _run(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
        if not torch.jit.is_tracing():
            self._check(x)
        feats = self.encoder((x - self.mean) / self.std)
        dec = self.decoder(feats)
        return feats, dec, self.head(dec[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = self._run(x)[2]["depth"]
        return F.interpolate(depth, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Depth plus what distillation needs: encoder "features", "decoder_features"
        and, for bins/dpm heads, "probs" (B,K,H,W at the input size; bilinear
        resampling keeps each pixel's sum at 1) and "bin_centers" (B,K)."""
        feats, dec, out = self._run(x)
        result: dict = {"features": feats, "decoder_features": dec}
        for key, value in out.items():
            if key == "probs":
                value = F.interpolate(value, size=x.shape[-2:], mode="bilinear", align_corners=False)
            result[key] = value
        if "probs" in result:
            # Same as upsampling the low-res depth (linear), but consistent with "probs".
            result["depth"] = expected_depth(result["probs"], result["bin_centers"])
        else:
            result["depth"] = F.interpolate(out["depth"], size=x.shape[-2:], mode="bilinear",
                                            align_corners=False)
        return result


def _build(cfg: ModelConfig, decoder_cls: type[nn.Module], default_channels: tuple[int, ...]) -> DepthNet:
    encoder = TimmEncoder(cfg.encoder, cfg.input_size, cfg.pretrained)
    channels = cfg.decoder_channels or default_channels
    decoder = decoder_cls(encoder.channels, encoder.reductions, channels)
    head = build_head(cfg, decoder.out_channels)
    return DepthNet(cfg, encoder, decoder, head)


@MODELS.register("student")
def student(cfg: ModelConfig) -> DepthNet:
    """Light FastDepth-style decoder: depthwise-separable stages, additive skips."""
    return _build(cfg, StudentDecoder, (128, 64, 32, 32))


@MODELS.register("teacher")
def teacher(cfg: ModelConfig) -> DepthNet:
    """Heavier U-Net decoder with 3x3 convs and concatenated skips."""
    return _build(cfg, UNetDecoder, (256, 128, 64, 32))


def build_model(cfg: ModelConfig) -> DepthNet:
    """Build the registered model ``cfg.name`` (random init unless cfg.pretrained)."""
    model = MODELS.get(cfg.name)(cfg)
    if cfg.lgconv_stages:
        insert_lgconv(model, cfg.lgconv_stages, cfg.lgconv_heads)
    return model
