"""Training configuration: YAML files in config/train/ map onto these dataclasses.

Load with ``load_train_config(path, overrides)``; overrides are dotted
``key=value`` strings (``optim.lr=1e-4 data.root=/data/nyu``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from depthkd_core.config import load_config
from depthkd_core.models import ModelConfig

SCHEDULERS = ("cosine", "step", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class DataConfig:
    """Where training frames come from and the size the network sees.

    root / val_root: reader roots; relative paths resolve against the working
    directory (run from the repository root). val_reader defaults to reader.
    height / width: the size frames are read at; the network's input, so multiples of 32
    (the encoders' stride), unless the model resizes every input to its own
    ``model.input_size`` (fastdepth): then any size, and the frames' own size (240x320
    for the simulator) resamples each image once, as a camera's frame is resampled once
    for the live node. The default 256x320 is the nearest multiple to a 240x320 camera.
    limit: use only the first N training frames.
    augment: horizontal flips and colour jitter; jitter: its strength s (brightness,
    contrast and saturation each scaled by U(1 - s, 1 + s); 0 < s < 1); zoom: with
    augment, crop a window of 1/z of the frame (z log-uniform in [1, zoom]; 1: never)
    and resize it back, as a longer lens would see it. For a teacher's labels the zoomed
    image is as valid as any other; a simulator's metric depth is still the depth there.
    """

    root: str
    reader: str = "sim"
    height: int = 256
    width: int = 320
    augment: bool = True
    jitter: float = 0.2
    zoom: float = 1.0
    val_root: str | None = None
    val_reader: str | None = None
    limit: int | None = None
    num_workers: int = 0

    def __post_init__(self) -> None:
        if not self.root:
            raise ValueError("data.root must name a dataset folder or file")
        if min(self.height, self.width) < 32:
            raise ValueError(f"data.height/width must be at least 32, got {self.height}x{self.width}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"data.jitter must be in [0, 1), got {self.jitter}")
        if not 1.0 <= self.zoom <= 4.0:
            raise ValueError(f"data.zoom must be in [1, 4], got {self.zoom}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {self.limit}")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule; the schedule advances once per step.

    scheduler: "cosine" anneals to 0 over max_steps; "step" multiplies the rate
    by gamma every step_size steps; "none" keeps it constant.
    grad_clip: max global gradient norm (None: no clipping).
    frozen: prefixes of the model's parameter names, by whole dotted components
        (``encoder``, ``decoder.0``, ``encoder.layers.1``: layer 1, not 10-13), kept as
        they start: no gradient, not in the optimiser. For a student that starts as its
        teacher: what it need not change is not moved by a transfer set that is not the
        teacher's data. Each prefix must name at least one parameter.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    scheduler: str = "cosine"
    step_size: int = 1000
    gamma: float = 0.5
    grad_clip: float | None = None
    frozen: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.frozen = tuple(str(p) for p in self.frozen)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}, got '{self.optimizer}'")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"optim.scheduler must be one of {SCHEDULERS}, got '{self.scheduler}'")
        if self.lr <= 0 or self.batch_size < 1 or self.step_size < 1:
            raise ValueError(f"optim needs lr > 0, batch_size >= 1, step_size >= 1; got lr={self.lr}, "
                             f"batch_size={self.batch_size}, step_size={self.step_size}")


@dataclass
class TrainConfig:
    """One training run. Every ``*_every`` counts optimiser steps; 0 disables it.

    The loop always checkpoints at the end, so ``resume`` after a finished run
    is a no-op. ``keep_checkpoints`` bounds how many step checkpoints stay on disk.
    """

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = "silog"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    eval_every: int = 0
    keep_checkpoints: int = 3
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "cpu"
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.model.resizes_input and (self.data.height % 32 or self.data.width % 32):
            raise ValueError(f"data.height/width must be multiples of 32 (the encoder's stride) "
                             f"for model '{self.model.name}' without its own input_size, "
                             f"got {self.data.height}x{self.data.width}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        for name in ("log_every", "ckpt_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """TrainConfig from a YAML file plus ``key=value`` overrides."""
    return load_config(TrainConfig, path, overrides)
