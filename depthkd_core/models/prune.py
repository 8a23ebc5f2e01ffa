"""Structured pruning of a FastDepth network: a narrower FastDepth that keeps the
channels of the wide one that matter most, with their weights (``prune_fastdepth``), or
a shorter one without its last decoder stages (``cut_decoder``).

A student made this way keeps the teacher's input geometry and, channel for channel,
what the teacher computes; distillation then only has to make up for what was cut.
Where the teacher is FastDepth and the student must be cheaper at the same input size
(docs/student.md), this is the student's start instead of a resolution change.

Every activation tensor of the network is a *channel space*: the stem's and each
block's output (E0..E13) and each decoder stage's (D1..D5; D2, D3, D4 are added to
E5, E3, E1, so each pair keeps one set of channels). A channel's importance is what
it passes on: its mean activation on the given images times the weight its
consumers give it (``|depthwise filter|_1 * |pointwise column|_1`` for a block,
``|w_c|`` for the output conv), summed over the consumers. The top channels of each
space are kept, in their original order. Then each pointwise conv is refitted by least
squares to the wide network's output at its kept channels, from the inputs the pruned
network gives it (a layer-wise distillation: at FastDepth's 0.6 width this takes the
agreement with the wide network on held-out simulated frames from 0.41 to 0.80).

Whole decoder stages are cut the same way (``cut_decoder``): the network stops after
its first stages and a new output conv, fitted by least squares to the wide network's
depth on the coarser grid, reads them; the depth is upsampled bilinearly.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .config import ModelConfig
from .fastdepth import DECODER_CHANNELS, SKIPS, FastDepthNet, named_maps

# decoder stage -> the encoder space it shares (the skip additions)
_SHARED = {f"D{stage}": f"E{block}" for stage, block in SKIPS.items()}


def _space(activation: str | None) -> str | None:
    return None if activation is None else _SHARED.get(activation, activation)


def _convs(n_blocks: int, n_stages: int) -> list[tuple[str | None, str | None, bool]]:
    """(activation read, activation written, depthwise) of every conv, in ``convs_and_caps``
    order; a decoder stage D2..D4 writes the sum after its skip addition."""
    convs: list[tuple[str | None, str | None, bool]] = [(None, "E0", False)]
    for i in range(1, n_blocks + 1):
        convs += [(f"E{i - 1}", f"E{i - 1}", True), (f"E{i - 1}", f"E{i}", False)]
    previous = f"E{n_blocks}"
    for s in range(1, n_stages + 1):
        convs += [(previous, previous, True), (previous, f"D{s}", False)]
        previous = f"D{s}"
    return [*convs, (previous, None, False)]


@torch.no_grad()
def channel_importance(model: FastDepthNet, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Importance of every channel of every space of ``model`` on ``images`` (B,3,H,W)."""
    was_training = model.training
    model.eval()
    out = model.forward_dict(images)
    model.train(was_training)
    activations = named_maps(out)
    convs, _ = model.convs_and_caps()
    layout = _convs(len(model.encoder.layers) - 1, len(model.decoder))
    importance: dict[str, torch.Tensor] = {}
    for k, (conv, (reads, _, depthwise)) in enumerate(zip(convs, layout)):
        if depthwise:  # a block or stage: depthwise filter, then the pointwise column
            weight = conv.weight.abs().flatten(1).sum(1) * convs[k + 1].weight.abs().sum((0, 2, 3))
        elif k == len(convs) - 1:  # the output conv
            weight = conv.weight.abs().sum((0, 2, 3))
        else:
            continue
        space = str(_space(reads))
        importance[space] = importance.get(space, 0) + activations[str(reads)].mean((0, 2, 3)) * weight
    return importance


def prune_fastdepth(model: FastDepthNet, encoder_channels: tuple[int, ...],
                    decoder_channels: tuple[int, ...], images: torch.Tensor, refit: bool = True,
                    ridge: float = 1e-4, samples: int = 32768) -> FastDepthNet:
    """A FastDepthNet of the given (narrower) widths holding ``model``'s most important
    channels (``channel_importance`` on ``images``), weights and activation caps copied
    (a scale head's too, for the bottleneck channels kept; the importance does not weigh
    what the head reads); with ``refit`` its pointwise convs are then refitted to
    ``model``'s outputs (``_refit_pointwise``)."""
    cfg: ModelConfig = replace(model.cfg, encoder_channels=tuple(encoder_channels),
                               decoder_channels=tuple(decoder_channels), pretrained=None)
    pruned = FastDepthNet(cfg)  # checks the skip widths agree
    widths = {f"E{i}": c for i, c in enumerate(encoder_channels)}
    widths |= {f"D{s}": c for s, c in enumerate(decoder_channels, start=1)}
    have = {f"E{i}": c for i, c in enumerate(model.encoder.channels)}
    have |= {f"D{s}": m[1][0].out_channels for s, m in enumerate(model.decoder, start=1)}
    for name, width in widths.items():
        if width > have[name]:
            raise ValueError(f"cannot prune {name} from {have[name]} to {width} channels: "
                             "pruning only removes channels")
    importance = channel_importance(model, images)
    keep = {name: torch.sort(torch.topk(score, widths[name]).indices).values
            for name, score in importance.items()}
    src_convs, src_caps = model.convs_and_caps()
    dst_convs, dst_caps = pruned.convs_and_caps()
    layout = _convs(len(model.encoder.layers) - 1, len(model.decoder))
    with torch.no_grad():
        for src, dst, (reads, writes, depthwise) in zip(src_convs, dst_convs, layout):
            source, target = _space(reads), _space(writes)
            weight, bias = src.weight, src.bias
            if target is not None:
                weight, bias = weight[keep[target]], bias[keep[target]]
            if source is not None and not depthwise:
                weight = weight[:, keep[source]]
            dst.weight.copy_(weight)
            dst.bias.copy_(bias)
        for src_cap, dst_cap in zip(src_caps, dst_caps):
            dst_cap.cap.copy_(src_cap.cap)
        for key, act in pruned.skip_acts.items():
            act.cap.copy_(model.skip_acts[key].cap)
        if model.scale is not None:  # it reads the bottleneck's kept channels, averaged
            head, source = pruned.scale.mlp, model.scale.mlp  # type: ignore[union-attr]
            head[0].weight.copy_(source[0].weight[:, keep[f"E{len(encoder_channels) - 1}"]])
            head[0].bias.copy_(source[0].bias)
            head[-1].load_state_dict(source[-1].state_dict())
    if refit:
        _refit_pointwise(model, pruned, keep, images, ridge, samples)
    return pruned


def widths_by_stride(model: FastDepthNet, ratios: dict[int, float], multiple: int = 8
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The widths for ``prune_fastdepth``: every space of ``model`` at ``ratios[stride]`` of
    its channels (stride of the feature map against the input: 2..32; a stride not given
    keeps all), rounded to ``multiple`` (at least one), shared skip spaces kept equal.
    A per-stride cut follows where the time goes: a channel at stride 2 costs 64 times
    what one at stride 16 does, while the deep, cheap layers carry the global context."""
    for stride, ratio in ratios.items():
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"prune ratio for stride {stride} must be in (0, 1], got {ratio}")

    def scaled(c: int, stride: int) -> int:
        if stride not in ratios:
            return c
        return min(c, max(multiple, int(round(c * ratios[stride] / multiple)) * multiple))

    encoder = tuple(scaled(c, r) for c, r in zip(model.encoder.channels, model.encoder.reductions))
    # decoder stage s is upsampled after it, except the fifth (the output conv runs first)
    strides = [model.encoder.reductions[-1] >> min(s, len(DECODER_CHANNELS) - 1)
               for s in range(1, len(model.decoder) + 1)]
    decoder = [scaled(m[1][0].out_channels, r) for m, r in zip(model.decoder, strides)]
    for stage, block in SKIPS.items():
        decoder[stage - 1] = encoder[block]
    return encoder, tuple(decoder)


def _conv_io(model: FastDepthNet, convs: list[nn.Conv2d], images: torch.Tensor
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output before its activation) of each of ``convs`` of ``model`` on ``images``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [c.register_forward_hook(lambda _m, args, out: seen.append((args[0], out))) for c in convs]
    try:
        model.forward_dict(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def _refit_pointwise(model: FastDepthNet, pruned: FastDepthNet, keep: dict[str, torch.Tensor],
                     images: torch.Tensor, ridge: float, samples: int) -> None:
    """Refit every pointwise conv of ``pruned`` (and its output conv), in graph order, so
    that it reproduces ``model``'s conv output at the kept channels from the inputs the
    pruned network actually gives it: least squares on ``samples`` random pixels of
    ``images``, with a ``ridge`` relative to the inputs' mean energy. What pruning removed
    from a layer's input is made up from what is left, layer by layer (a distillation of
    each layer), before any end-to-end training."""
    model.eval()
    pruned.eval()
    teacher_outputs = [out for _, out in _conv_io(model, model.convs_and_caps()[0], images)]
    layout = _convs(len(model.encoder.layers) - 1, len(model.decoder))
    convs, _ = pruned.convs_and_caps()
    generator = torch.Generator().manual_seed(0)
    for k, (conv, (reads, writes, depthwise)) in enumerate(zip(convs, layout)):
        if reads is None or depthwise:
            continue  # the stem's RGB input is complete; a depthwise filter has one input
        x = _conv_io(pruned, [conv], images)[0][0]
        target = teacher_outputs[k]
        if writes is not None:
            target = target[:, keep[str(_space(writes))]]
        _fit_pointwise(conv, x, target, ridge, samples, generator)


def _fit_pointwise(conv: nn.Conv2d, x: torch.Tensor, target: torch.Tensor, ridge: float,
                   samples: int, generator: torch.Generator) -> None:
    """Set the 1x1 ``conv`` to the least-squares map from ``x`` to ``target`` (B,C,H,W, same
    grid) on ``samples`` random pixels, with a ``ridge`` relative to the inputs' mean energy."""
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    goal = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
    pick = torch.randperm(rows.shape[0], generator=generator)[:samples]
    rows = torch.cat([rows[pick], torch.ones(len(pick), 1)], dim=1).double()
    gram = rows.T @ rows
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    solution = torch.linalg.solve(gram, rows.T @ goal[pick].double()).float()
    conv.weight.copy_(solution[:-1].T.reshape(conv.weight.shape))
    conv.bias.copy_(solution[-1])


@torch.no_grad()
def cut_decoder(model: FastDepthNet, stages: int, images: torch.Tensor, ridge: float = 1e-4,
                samples: int = 32768) -> FastDepthNet:
    """``model`` with only its first ``stages`` decoder stages: every kept weight and cap
    copied, and a new output conv fitted by least squares to ``model``'s depth on
    ``images`` (area-pooled to the cut's grid). The full-resolution stages cost most of a
    small FastDepth's time, and its depth is smooth: on a stride-8 grid, upsampled
    bilinearly, the teacher's own depth agrees with itself at delta1 1.000 on held-out
    simulated frames (docs/student.md)."""
    if not 1 <= stages <= len(model.decoder):
        raise ValueError(f"cannot cut a decoder of {len(model.decoder)} stages to {stages}")
    cut = FastDepthNet(replace(model.cfg, decoder_stages=stages, pretrained=None))
    keys = cut.state_dict().keys()
    kept = {k: v for k, v in model.state_dict().items() if k in keys and not k.startswith("out.")}
    missing, _ = cut.load_state_dict(kept, strict=False)
    assert all(k.startswith("out.") for k in missing), missing  # out_act's cap is copied too
    model.eval()
    cut.eval()
    out = cut.forward_dict(images)
    features = out["decoder_features"][-1]  # type: ignore[index]
    target = nn.functional.adaptive_avg_pool2d(model(images), features.shape[-2:])
    if cut.scale is not None:  # the output conv's result is multiplied by the image's factor
        target = target / cut.scale(out["features"][-1])  # type: ignore[index]
    _fit_pointwise(cut.out, features, target, ridge, samples, torch.Generator().manual_seed(0))
    return cut
