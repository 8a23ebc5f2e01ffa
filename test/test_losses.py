"""Depth losses against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from depthkd_core.losses import LOSSES, build_loss


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None, None]


PRED = t([[1.0, 2.0], [3.0, 4.0]])
TARGET = t([[1.0, 1.0], [1.0, 1.0]])
MASK = t([[1, 1], [1, 0]]).bool()


def test_registry_holds_the_losses() -> None:
    assert {"hu_depth", "l1", "log_l1", "mse", "silog"} <= set(LOSSES.keys())
    with pytest.raises(KeyError, match="unknown loss 'nope'"):
        build_loss("nope")


def test_l1_hand_values() -> None:
    l1 = build_loss("l1")
    assert l1(PRED, TARGET, MASK).item() == pytest.approx((0 + 1 + 2) / 3)
    assert l1(PRED, TARGET).item() == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert l1(PRED, PRED, MASK).item() == 0.0


def test_mse_hand_values() -> None:
    mse = build_loss("mse")
    assert mse(PRED, TARGET, MASK).item() == pytest.approx((0 + 1 + 4) / 3)
    assert mse(PRED, PRED).item() == 0.0


def test_empty_mask_gives_zero_not_nan() -> None:
    empty = torch.zeros_like(MASK)
    for name in ("l1", "log_l1", "mse", "silog", "hu_depth"):
        pred = PRED.clone().requires_grad_(True)
        value = build_loss(name)(pred, TARGET, empty)
        value.backward()
        assert value.item() == 0.0, name
        assert torch.isfinite(pred.grad).all(), name


def test_silog_hand_values() -> None:
    silog = build_loss("silog")
    pred, target = t([[math.e, 1.0, 5.0]]), t([[1.0, 1.0, 0.0]])
    mask = target > 0
    # g = [1, 0]: mean(g^2) = 0.5, mean(g) = 0.5 -> 10 * sqrt(0.5 - 0.85 * 0.25)
    assert silog(pred, target, mask).item() == pytest.approx(10 * math.sqrt(0.2875), rel=1e-6)
    # a global scale only leaves (1 - lambda) of the log-error variance
    assert silog(2 * TARGET, TARGET).item() == pytest.approx(10 * math.sqrt(0.15) * math.log(2), rel=1e-5)
    assert build_loss("silog", lambd=1.0)(2 * TARGET, TARGET).item() == pytest.approx(0.0, abs=1e-5)


def test_silog_zero_at_perfect_prediction_with_finite_gradient() -> None:
    pred = PRED.clone().requires_grad_(True)
    value = build_loss("silog")(pred, PRED.clone(), MASK)
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(pred.grad).all()


def test_log_l1_hand_values_and_robustness() -> None:
    log_l1 = build_loss("log_l1", alpha=1.0)
    # |log 1|, |log 2|, |log 3| over the three valid pixels
    assert log_l1(PRED, TARGET, MASK).item() == pytest.approx((math.log(2) + math.log(3)) / 3, rel=1e-6)
    assert build_loss("log_l1")(PRED, TARGET, MASK).item() == pytest.approx(
        10 * (math.log(2) + math.log(3)) / 3, rel=1e-6)
    # one pixel 100x off moves the absolute log error by log(100)/n, the squared one by
    # far more: the outlier's share of the gradient stays that of one pixel
    depth = torch.ones(1, 1, 4, 4)
    outlier = depth.clone()
    outlier[0, 0, 0, 0] = 100.0
    pred = outlier.clone().requires_grad_(True)
    log_l1(pred, depth).backward()
    assert pred.grad[0, 0, 0, 0].item() == pytest.approx(1 / (16 * 100.0), rel=1e-5)
    with pytest.raises(ValueError, match="alpha > 0"):
        build_loss("log_l1", alpha=0.0)


def test_silog_rejects_bad_lambda() -> None:
    with pytest.raises(ValueError, match="lambd"):
        build_loss("silog", lambd=1.5)


def test_hu_constant_when_equal() -> None:
    depth = torch.rand(2, 1, 5, 6) + 0.5
    # l_depth = ln(a), l_grad = 2 ln(a), l_normal = 0
    assert build_loss("hu_depth")(depth, depth).item() == pytest.approx(3 * math.log(0.5), rel=1e-6)
    assert build_loss("hu_depth", a=1.0)(depth, depth).item() == pytest.approx(0.0, abs=1e-7)


def ramp(slope: float, height: int = 6, width: int = 7) -> torch.Tensor:
    return (slope * torch.arange(width, dtype=torch.float32)).expand(1, 1, height, width).clone()


def test_hu_ramp_against_flat_target() -> None:
    s, a = 2.0, 0.5
    pred, target = ramp(s), torch.zeros(1, 1, 6, 7)
    l_depth = sum(math.log(s * x + a) for x in range(7)) / 7
    l_grad = math.log(s + a) + math.log(a)  # interior dx = s, dy = 0
    l_normal = 1 - 1 / math.sqrt(1 + s * s)  # n_d = (-s, 0, 1), n_g = (0, 0, 1)
    expected = l_depth + l_grad + l_normal
    assert build_loss("hu_depth")(pred, target).item() == pytest.approx(expected, rel=1e-6)
    weighted = build_loss("hu_depth", grad_weight=0.0, normal_weight=2.0)(pred, target)
    assert weighted.item() == pytest.approx(l_depth + 2 * l_normal, rel=1e-6)


def test_hu_invalid_pixel_and_its_neighbours_are_ignored() -> None:
    s, a = 2.0, 0.5
    pred, target = ramp(s), torch.zeros(1, 1, 6, 7)
    pred[0, 0, 1, 1] = 1000.0  # would dominate every term if it leaked
    mask = torch.ones_like(pred, dtype=torch.bool)
    mask[0, 0, 1, 1] = False
    per_col = [math.log(s * x + a) for x in range(7)]
    l_depth = (6 * sum(per_col) - per_col[1]) / 41
    expected = l_depth + math.log(s + a) + math.log(a) + 1 - 1 / math.sqrt(1 + s * s)
    assert build_loss("hu_depth")(pred, target, mask).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["l1", "log_l1", "mse", "silog", "hu_depth"])
def test_losses_finite_and_differentiable(name: str) -> None:
    torch.manual_seed(0)
    pred = (torch.rand(2, 1, 8, 8) + 0.1).requires_grad_(True)
    target = torch.rand(2, 1, 8, 8) + 0.1
    value = build_loss(name)(pred, target, target > 0.3)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value)
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_shape_and_mask_checks() -> None:
    loss = build_loss("l1")
    with pytest.raises(ValueError, match="target shape"):
        loss(PRED, TARGET[..., :1])
    with pytest.raises(ValueError, match="mask must be bool"):
        loss(PRED, TARGET, MASK.float())
    with pytest.raises(ValueError, match=r"pred must be \(B,1,H,W\)"):
        loss(PRED[0], TARGET[0])
