"""Model cost: parameters, multiply-accumulates and CPU/GPU latency (torch)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not), shared tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def _device_dtype(model: object) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"input_shape must be (B, C, H, W) with positive sizes, got {input_shape}")
    return shape


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Eval mode for the duration (BatchNorm/dropout as at inference), then restore."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def count_macs(model: nn.Module, input_shape: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-accumulates of one forward pass: ``FlopCounterMode`` FLOPs / 2.

    Counts matmuls and convolutions (what papers report as MACs); elementwise
    ops, norms and bias additions are not counted.
    """
    shape = _check_shape(input_shape)
    device, dtype = _device_dtype(model)
    x = torch.zeros(shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() // 2


def measure_latency(model: Callable[[torch.Tensor], object], input_shape: Sequence[int],
                    warmup: int = 3, runs: int = 10) -> dict[str, float]:
    """Wall-clock milliseconds per forward pass: ``mean_ms``, ``median_ms``, ``p90_ms``.

    ``model`` is an ``nn.Module`` or any callable on a (B,3,H,W) tensor (e.g. a
    ``Teacher`` wrapping ONNX Runtime); it runs in eval mode under ``inference_mode``.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    shape = _check_shape(input_shape)
    device, dtype = _device_dtype(model)
    x = torch.rand(shape, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with eval_mode(model), torch.inference_mode():
        for i in range(warmup + runs):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    ms = np.asarray(times)
    return {"mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90))}
