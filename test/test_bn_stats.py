"""BatchNorm-statistics loss (DeepInversion / data-free distillation Eq. 5-7)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from depthkd_core.losses import LOSSES
from depthkd_core.losses.bn_stats import BatchNormStatsLoss
from depthkd_core.models import ModelConfig, build_model


def _toy() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return net.eval()


def test_registered() -> None:
    assert LOSSES.get("bn_stats") is BatchNormStatsLoss


def test_hand_computed_one_layer() -> None:
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 1.0]))
    loss = BatchNormStatsLoss(bn)
    # channel 0: values 1, 3 -> mean 2, biased var 1; channel 1: 0, 0 -> mean 0, var 0
    x = torch.tensor([[[[1.0]], [[0.0]]], [[[3.0]], [[0.0]]]])
    with loss.recording():
        bn(x)
    # ||(2,0) - (0,1)|| + ||(1,0) - (1,1)|| = sqrt(5) + 1
    assert loss().item() == pytest.approx(math.sqrt(5) + 1, rel=1e-6)


def test_hooks_match_manual_statistics() -> None:
    net = _toy()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss = BatchNormStatsLoss(net)
    x = torch.rand(3, 3, 7, 9, requires_grad=True)
    with loss.recording():
        net(x)
    inputs = [net[0](x), net[3](net[2](net[1](net[0](x))))]  # the two BN layers' inputs
    assert len(loss.stats) == 2
    expected = 0.0
    for (mean, var, layer), inp, bn in zip(loss.stats, inputs, (net[1], net[4])):
        assert layer is bn
        flat = inp.detach().transpose(0, 1).reshape(inp.shape[1], -1)
        torch.testing.assert_close(mean, flat.mean(1))
        torch.testing.assert_close(var, flat.var(1, unbiased=False))
        expected += ((flat.mean(1) - bn.running_mean).norm() + (flat.var(1, unbiased=False)
                                                                - bn.running_var).norm()).item()
    value = loss()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # the loss reaches the images
    for k, v in net.state_dict().items():  # eval mode: running stats untouched
        assert torch.equal(v, before[k]), k


def test_records_only_inside_block_and_remove() -> None:
    net = _toy()
    loss = BatchNormStatsLoss(net)
    net(torch.rand(2, 3, 5, 5))
    assert loss.stats == []
    with pytest.raises(ValueError, match="no statistics recorded"):
        loss()
    loss.remove()
    with loss.recording():
        net(torch.rand(2, 3, 5, 5))
    assert loss.stats == []


def test_real_teacher_every_bn_layer() -> None:
    teacher = build_model(ModelConfig(name="teacher", encoder="resnet18",
                                      decoder_channels=(32, 16, 16, 8))).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())
    loss = BatchNormStatsLoss(teacher)
    with torch.no_grad(), loss.recording():
        teacher(torch.rand(2, 3, 64, 64))
    assert n_bn > 0 and len(loss.stats) == n_bn
    assert torch.isfinite(loss())


def test_no_batchnorm_is_refused() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        BatchNormStatsLoss(nn.Sequential(nn.Conv2d(3, 3, 1), nn.LayerNorm(3)))
