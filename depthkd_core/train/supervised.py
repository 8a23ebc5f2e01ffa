"""Supervised training with ground-truth depth (`depthkd train`): teachers and baselines."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from depthkd_core.data import DepthDataset, build_reader
from depthkd_core.losses import build_loss
from depthkd_core.models import build_model
from depthkd_core.train.config import DataConfig, TrainConfig, load_train_config
from depthkd_core.train.trainer import StepFn, Trainer, seed_everything


def build_datasets(data: DataConfig) -> tuple[Dataset, Dataset | None]:
    """Training set (augmented, first ``limit`` frames) and optional validation set."""
    train: Dataset = DepthDataset(build_reader(data.reader, data.root), data.height, data.width,
                                  augment=data.augment)
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
    parser.add_argument("--config", type=Path, required=True, help="YAML file in config/train/")
    parser.add_argument("--out", default=None, help="output directory (overrides out_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=1e-4 data.root=data/sim")


def run_cli(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.overrides)
    # set directly: a path is not a YAML scalar (``--out 2024`` would become an int)
    if args.out is not None:
        cfg = replace(cfg, out_dir=str(args.out))
    if args.resume:
        cfg = replace(cfg, resume=True)
    final = train_supervised(cfg)
    if dist.is_initialized():  # joined under torchrun by the Trainer
        dist.destroy_process_group()
    print(f"final checkpoint: {final}")
    return 0
