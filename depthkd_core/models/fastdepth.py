"""FastDepth (MobileNet-NNConv5; Wofk et al., ICRA 2019) with BatchNorm folded, registry key "fastdepth".

The architecture of a real, deployed indoor depth model, so that a student can start
from its weights: ``pretrained: fast_depth_224.onnx`` imports them from an ONNX file of
this architecture (``import_onnx_weights``; int8 DequantizeLinear weights are
dequantised). Training it at a lower input resolution than the original is the
"resolution" student of the real-camera recipe (docs/student.md): it keeps what the
teacher learnt from real images and needs a quarter of its MACs at half the side.

Layout: a 3x3/2 stem and 13 depthwise-separable blocks (MobileNet v1, widths in
``ModelConfig.encoder_channels``), a decoder of 5 stages (depthwise 5x5 + pointwise,
nearest x2 upsampling; widths in ``decoder_channels``) with additive skips from the
encoder at strides 8, 4 and 2, and a pointwise layer to depth (times a per-image factor
from ``GlobalScale`` when ``ModelConfig.scale_head`` is set). With
``ModelConfig.decoder_stages`` < 5 the decoder stops early and its depth, on a grid of
stride 32 / 2**stages, is upsampled bilinearly (``models.prune.cut_decoder``). Input RGB in [0, 1]
(no mean/std, as FastDepth), output metric depth at the input size. With
``ModelConfig.input_size`` the network runs at that size whatever it is given
(antialiased resize in, bilinear out): a student trained on larger images than it
runs on, beside a teacher that sees them sharp; an export at that size has no resize.

Every activation is ``clamp(x, 0, cap)``: ReLU6 in the encoder, ReLU in the decoder,
and an imported file's int8 activation ranges (its Clip nodes) where it has them, so
an imported model computes what the file does. The caps are buffers (in checkpoints,
exported), never trained.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import FASTDEPTH_DECODER_STAGES, ModelConfig
from .depthnet import MODELS
from .teacher_base import resize

# MobileNet v1 at width 1.0 (the FastDepth paper's encoder) and NNConv5's decoder.
ENCODER_CHANNELS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
DECODER_CHANNELS = (512, 256, 128, 64, 32)
assert len(DECODER_CHANNELS) == FASTDEPTH_DECODER_STAGES
# Stride of each depthwise conv of the 13 blocks.
BLOCK_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
# Decoder stage (1-based) -> the encoder output (0 = stem, i = block i) added after it.
SKIPS = {2: 5, 3: 3, 4: 1}
# Decoder stage (1-based) -> an encoder output on the grid its x2 upsampling lands on
# (strides 16, 8, 4, 2). A side that is not a multiple of 32 is rounded up at each
# stride-2 conv, so the doubled grid can be a cell too long: cropped to this one's size.
STAGE_GRIDS = {1: 11, 2: 5, 3: 3, 4: 1}


class CappedReLU(nn.Module):
    """``clamp(x, 0, cap)`` with a fixed (buffer) cap; inf = plain ReLU."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.register_buffer("cap", torch.tensor(float(cap)))
        self.register_buffer("floor", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One Clip with constant bounds, which ONNX Runtime fuses into the conv before it;
        # relu-then-minimum exported a separate Min that broke its blocked (NCHWc) layout
        # around every layer and cost 0.4x of the teacher's time in reorders.
        return torch.clamp(x, self.floor, self.cap)


class ConvAct(nn.Sequential):
    """Conv (bias, 'same' padding) followed by a capped ReLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, depthwise: bool = False,
                 cap: float = math.inf) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=cin if depthwise else 1),
                         CappedReLU(cap))


class FastDepthEncoder(nn.Module):
    """Stem + 13 depthwise-separable blocks; returns every block's output (stem first)."""

    fixed_size = None  # any size >= 32 (FastDepthNet crops each upsampled grid to its skip's)
    reductions = (2, 2, 4, 4, 8, 8, 16, 16, 16, 16, 16, 16, 32, 32)

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.channels = list(channels)
        layers = [ConvAct(3, channels[0], 3, 2, cap=6.0)]
        for cin, cout, stride in zip(channels[:-1], channels[1:], BLOCK_STRIDES):
            layers.append(nn.Sequential(ConvAct(cin, cin, 3, stride, depthwise=True, cap=6.0),
                                        ConvAct(cin, cout, 1, cap=6.0)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class GlobalScale(nn.Module):
    """One depth factor per image, exp(MLP(average-pooled features)); exactly 1 at start."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.mlp(features.mean(dim=(2, 3))))[:, :, None, None]


class FastDepthNet(nn.Module):
    """RGB [0,1] (B,3,H,W), H and W >= 32 -> metric depth (B,1,H,W)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        enc = tuple(cfg.encoder_channels or ENCODER_CHANNELS)
        dec = tuple(cfg.decoder_channels or DECODER_CHANNELS)
        if len(enc) != len(ENCODER_CHANNELS) or len(dec) != len(DECODER_CHANNELS):
            raise ValueError(f"fastdepth needs {len(ENCODER_CHANNELS)} encoder_channels and "
                             f"{len(DECODER_CHANNELS)} decoder_channels, got {enc} and {dec}")
        for stage, block in SKIPS.items():
            if dec[stage - 1] != enc[block]:
                raise ValueError(f"fastdepth: decoder stage {stage} ({dec[stage - 1]} channels) "
                                 f"is added to encoder block {block} ({enc[block]} channels)")
        self.cfg = cfg
        self.encoder = FastDepthEncoder(enc)
        stages, cin = [], enc[-1]
        for cout in dec[:cfg.decoder_stages]:
            stages.append(nn.Sequential(ConvAct(cin, cin, 5, depthwise=True),
                                        ConvAct(cin, cout, 1)))
            cin = cout
        self.decoder = nn.ModuleList(stages)
        self.skip_acts = nn.ModuleDict({str(s): CappedReLU(math.inf) for s in SKIPS})
        self.out = nn.Conv2d(cin, 1, 1)
        # a random network starts mid-range: below min_depth the output (ReLU, clamp) has no gradient
        nn.init.constant_(self.out.bias, math.sqrt(cfg.min_depth * cfg.max_depth))
        self.out_act = CappedReLU(cfg.max_depth)
        self.scale = GlobalScale(enc[-1], cfg.scale_head) if cfg.scale_head else None

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"FastDepthNet expects images (B,3,H,W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is below 32, the encoder's stride")

    def forward_dict(self, x: torch.Tensor) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Depth (at the input size) plus the encoder "features" and "decoder_features"
        (at the run size; the last stage's at half of it), as DepthNet's."""
        size = tuple(x.shape[-2:])
        if self.cfg.input_size is not None:
            x = resize(x, self.cfg.input_size)
        if not torch.jit.is_tracing():
            self._check(x)
        feats = self.encoder(x.clamp(0.0, 1.0))
        y, dec = feats[-1], []
        for i, stage in enumerate(self.decoder, start=1):
            y = stage(y)
            if i < len(DECODER_CHANNELS):
                y = _double_to(y, feats[STAGE_GRIDS[i]].shape[-2:])
            if i in SKIPS:
                y = self.skip_acts[str(i)](y + feats[SKIPS[i]])
            dec.append(y)
        # The 1x1 output conv and its clamp commute with nearest upsampling: applied before
        # the last x2 they compute the same depth on a quarter of the pixels.
        y = self.out(y)
        if self.scale is not None:
            y = y * self.scale(feats[-1])
        if not self.cfg.cuts_decoder:
            depth = _double_to(self.out_act(y), x.shape[-2:])
        else:
            depth = F.interpolate(self.out_act(y), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
        depth = resize(depth.clamp_min(self.cfg.min_depth), size)
        return {"features": feats, "decoder_features": dec, "depth": depth}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dict(x)["depth"]  # type: ignore[return-value]

    def convs_and_caps(self) -> tuple[list[nn.Conv2d], list[CappedReLU]]:
        """Every conv in graph order, each with the activation after it."""
        pairs: list[tuple[nn.Conv2d, CappedReLU]] = []
        for module in [*self.encoder.layers, *self.decoder]:
            pairs += [(m[0], m[1]) for m in module.modules() if isinstance(m, ConvAct)]
        pairs.append((self.out, self.out_act))
        return [c for c, _ in pairs], [a for _, a in pairs]


def _double_to(y: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Nearest x2 upsampling cropped to ``size``: where a side rounded up on the way down,
    the doubled grid is a cell longer (an empty crop exports to nothing)."""
    return F.interpolate(y, scale_factor=2.0, mode="nearest")[..., :size[0], :size[1]]


def named_maps(out: dict[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The activation maps of a ``FastDepthNet.forward_dict`` result by name: ``E0``..``E13``
    the stem's and each encoder block's output, ``D1``..``D5`` each decoder stage's."""
    maps = {f"E{i}": f for i, f in enumerate(out["features"])}
    return maps | {f"D{s}": f for s, f in enumerate(out["decoder_features"], start=1)}


@MODELS.register("fastdepth")
def build_fastdepth(cfg: ModelConfig) -> FastDepthNet:
    """FastDepth (MobileNet-NNConv5, Wofk et al. 2019): its own encoder, BN folded, capped ReLUs."""
    model = FastDepthNet(cfg)
    if cfg.pretrained is None:
        return model
    if Path(cfg.pretrained).suffix == ".onnx":
        if cfg.cuts_decoder:
            raise ValueError(f"{cfg.pretrained} holds all {FASTDEPTH_DECODER_STAGES} decoder stages; "
                             f"a fastdepth with decoder_stages={cfg.decoder_stages} needs its new "
                             "output conv fitted: import the whole network and cut it with "
                             "models.prune.cut_decoder (the student recipe does)")
        return import_onnx_weights(model, cfg.pretrained)
    # a depthkd checkpoint of these widths, e.g. a pruned teacher (models/prune.py)
    from .checkpoint import read_checkpoint

    try:
        model.load_state_dict(read_checkpoint(cfg.pretrained)["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{cfg.pretrained} does not fit this fastdepth (its widths, "
                         f"decoder_stages={cfg.decoder_stages}, scale_head={cfg.scale_head}): "
                         f"{exc}") from None
    return model


def import_onnx_weights(model: FastDepthNet, path: str | Path) -> FastDepthNet:
    """Load the weights and activation caps of a FastDepth ONNX file into ``model``.

    The file's Conv nodes, in graph order, must have exactly ``model``'s shapes
    (ValueError names the file's widths otherwise). Each activation cap is the
    tightest Clip/Relu bound on the conv's (or skip add's) output chain.
    """
    import onnx

    from .onnx_torch import constant_values

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FastDepth ONNX weights not found: {path}")
    graph = onnx.load(str(path)).graph
    consts = constant_values(graph)
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    convs = [n for n in graph.node if n.op_type == "Conv"]
    adds = [n for n in graph.node if n.op_type == "Add"]
    targets, acts = model.convs_and_caps()
    shapes = [tuple(consts[n.input[1]].shape) for n in convs]
    if shapes != [tuple(c.weight.shape) for c in targets]:
        widths = [s[0] for s in shapes]
        raise ValueError(f"{path} is not a FastDepth of this model's widths: its {len(convs)} convs "
                         f"have output channels {widths}; the model expects "
                         f"{[c.weight.shape[0] for c in targets]} (set model.encoder_channels and "
                         "model.decoder_channels to the file's)")
    if len(adds) != len(SKIPS):
        raise ValueError(f"{path}: expected {len(SKIPS)} skip additions, found {len(adds)}")

    def chain_cap(name: str) -> float:
        cap = math.inf
        while len(consumers.get(name, [])) == 1 and consumers[name][0].op_type in ("Clip", "Relu"):
            node = consumers[name][0]
            if node.op_type == "Clip" and len(node.input) > 2 and node.input[2]:
                cap = min(cap, float(consts[node.input[2]]))
            name = node.output[0]
        return cap

    with torch.no_grad():
        for node, conv, act in zip(convs, targets, acts):
            conv.weight.copy_(torch.from_numpy(consts[node.input[1]].astype(np.float32)))
            if len(node.input) > 2 and node.input[2]:
                conv.bias.copy_(torch.from_numpy(consts[node.input[2]].astype(np.float32)))
            else:
                conv.bias.zero_()
            act.cap.fill_(min(float(act.cap), chain_cap(node.output[0])))
        # the adds appear in decoder order: stage 2, 3, 4
        for node, key in zip(adds, sorted(model.skip_acts, key=int)):
            model.skip_acts[key].cap.fill_(chain_cap(node.output[0]))
    return model
