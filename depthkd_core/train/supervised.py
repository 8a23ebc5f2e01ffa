"""Supervised training with ground-truth depth (`depthkd train`): teachers and baselines."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from depthkd_core.data import DepthDataset, build_reader
from depthkd_core.losses import build_loss
from depthkd_core.models import build_model
from depthkd_core.train.config import DataConfig, TrainConfig, load_train_config
from depthkd_core.train.run_cli import add_run_arguments, run_from_args
from depthkd_core.train.trainer import StepFn, Trainer, seed_everything


def build_datasets(data: DataConfig) -> tuple[Dataset, Dataset | None]:
    """Training set (augmented, first ``limit`` frames) and optional validation set."""
    train: Dataset = DepthDataset(build_reader(data.reader, data.root), data.height, data.width,
                                  augment=data.augment, jitter=data.jitter,
                                  zoom=data.zoom)
    if data.limit is not None:
        train = Subset(train, range(min(data.limit, len(train))))
    val = None
    if data.val_root is not None:
        val = DepthDataset(build_reader(data.val_reader or data.reader, data.val_root),
                           data.height, data.width, augment=False)
    return train, val


def supervised_step(loss_fn: nn.Module) -> StepFn:
    """Step function: ``loss_fn(model(image), depth, valid)`` as the loss to minimise."""
    def step(model: nn.Module, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"loss": loss_fn(model(batch["image"]), batch["depth"], batch["valid"])}
    return step


def train_supervised(cfg: TrainConfig) -> Path:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.loss``; return ``out_dir/final.pt``."""
    loss_fn = build_loss(cfg.loss, **cfg.loss_kwargs)
    train_set, val_set = build_datasets(cfg.data)
    seed_everything(cfg.seed)  # identical initial weights for a given seed
    model = build_model(cfg.model)
    trainer = Trainer(model, supervised_step(loss_fn), train_set, cfg, val_set=val_set)
    return trainer.fit()


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "config/train/", "optim.lr=1e-4 data.root=data/sim")


def run_cli(args: argparse.Namespace) -> int:
    return run_from_args(args, load_train_config, train_supervised)
