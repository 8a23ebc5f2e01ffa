"""Local-global convolution (LG-Conv), DisDepth Sec. 3.2 (METHODS.md section 3).

A global branch beside an existing (pretrained) conv block::

    h      = ReLU(Conv1x1(x))                      x pooled to the block's output stride
    hcat   = [h, mean_i(h) broadcast]
    a_m    = softmax_i(Conv1x1_a(hcat))            M spatial attention maps
    g_m    = sum_i a_{m,i} W h_i                    M global vectors (W: Linear to C_out)
    gate_m = sigmoid(Conv1x1_b(hcat))              broadcast branch, per pixel, in [0, 1]
    out    = local(x) + BN(sum_m gate_m * g_m)

The BN scale starts at ``init_scale`` (1e-5), so a pretrained block is
undisturbed at first. ``insert_lgconv`` wraps chosen encoder stages of a
DepthNet in place (timm itself is not edited).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LGConv(nn.Module):
    """``local`` (any block (B,Cin,H,W) -> (B,Cout,H/s,W/s)) plus the global branch."""

    def __init__(self, local: nn.Module, in_channels: int, out_channels: int, stride: int = 1,
                 heads: int = 4, hidden: int | None = None, init_scale: float = 1e-5) -> None:
        super().__init__()
        if heads < 1 or stride < 1:
            raise ValueError(f"LGConv needs heads >= 1 and stride >= 1, got {heads}, {stride}")
        hidden = hidden or max(8, out_channels // 4)
        self.local, self.stride = local, stride
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True))
        self.attn = nn.Conv2d(2 * hidden, heads, 1)
        self.gate = nn.Conv2d(2 * hidden, heads, 1)
        self.value = nn.Linear(hidden, out_channels)
        self.norm = nn.BatchNorm2d(out_channels)
        nn.init.constant_(self.norm.weight, init_scale)
        nn.init.zeros_(self.norm.bias)

    def global_branch(self, x: torch.Tensor) -> torch.Tensor:
        """BN(gate * global) at the block's output stride: (B,Cout,H/s,W/s)."""
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        h = self.reduce(x)
        height, width = h.shape[-2:]
        # sum / count, not mean(): see BinsHead (opset-18 ReduceMean does not convert to 17)
        pooled = (h.sum(dim=(2, 3), keepdim=True) / (height * width)).expand(-1, -1, height, width)
        hcat = torch.cat([h, pooled], dim=1)
        attn = torch.softmax(self.attn(hcat).flatten(2), dim=-1)          # (B,M,HW)
        vectors = self.value(torch.bmm(attn, h.flatten(2).transpose(1, 2)))  # (B,M,Cout)
        gate = torch.sigmoid(self.gate(hcat))                             # (B,M,H,W)
        return self.norm(torch.einsum("bmhw,bmc->bchw", gate, vectors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local(x)
        glob = self.global_branch(x)
        if glob.shape[-2:] != local.shape[-2:]:
            glob = F.interpolate(glob, size=local.shape[-2:], mode="nearest")
        return local + glob


def _stage_names(body: nn.Module, stages: tuple[int, ...]) -> list[str]:
    names = body.feature_info.module_name()
    try:
        picked = [names[s] for s in stages]
    except IndexError:
        raise ValueError(f"lgconv_stages {stages} out of range for an encoder with "
                         f"{len(names)} feature stages") from None
    return list(dict.fromkeys(picked))


def _probe(body: nn.Module, modules: dict[str, nn.Module], size: int) -> dict[str, tuple[int, int, int]]:
    """(in channels, out channels, stride) of each module from one forward at ``size``."""
    found: dict[str, tuple[int, int, int]] = {}
    hooks = [m.register_forward_hook(
        lambda mod, inp, out, key=key: found.__setitem__(
            key, (inp[0].shape[1], out.shape[1], inp[0].shape[-1] // out.shape[-1])))
        for key, m in modules.items()]
    was_training = body.training
    try:
        with torch.no_grad():
            body.eval()(torch.zeros(1, 3, size, size))
    finally:
        body.train(was_training)
        for hook in hooks:
            hook.remove()
    return found


def insert_lgconv(model: nn.Module, stages: tuple[int, ...] = (-4, -3, -2, -1), heads: int = 4,
                  init_scale: float = 1e-5) -> list[str]:
    """Wrap the blocks that output encoder feature ``stages`` of ``model`` (a DepthNet with a
    CNN timm encoder) in LGConv, in place; return the wrapped module names.

    ``stages`` index the encoder's feature list (negative from the deepest; the
    default is the last four, as DisDepth). A transformer encoder is refused.
    """
    encoder = model.encoder
    if encoder.nhwc or encoder.reassemble is not None:
        raise ValueError(f"LG-Conv goes into CNN encoders; '{encoder.name}' is a transformer")
    body = encoder.body
    names = _stage_names(body, tuple(stages))
    # timm's FeatureListNet flattens "a.b" into a top-level "a_b"; EfficientNetFeatures keeps paths
    paths = [n if n.replace(".", "_") not in body._modules else n.replace(".", "_") for n in names]
    modules = {path: body.get_submodule(path) for path in paths}
    shapes = _probe(body, modules, size=2 * encoder.reductions[-1])
    for path, module in modules.items():
        cin, cout, stride = shapes[path]
        parent_name, _, leaf = path.rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        setattr(parent, leaf, LGConv(module, cin, cout, stride, heads, init_scale=init_scale))
    return paths
