"""`depthkd distill`: teacher + student + data + method, run by the shared Trainer.

    depthkd distill --config config/distill/datafree.yaml [--out DIR] [--resume] [key=value ...]

The run folder is a ``depthkd train`` folder (config.yaml, tb/, ckpt_*.pt,
final.pt): final.pt holds the student, so ``depthkd evaluate`` and
``depthkd export`` take it as they are. Method modules (G, generators) and
their optimisers are in the step checkpoints, so ``--resume`` is exact.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from depthkd_core.methods import METHODS
from depthkd_core.methods.base import DistillMethod
from depthkd_core.methods.config import DistillConfig, load_distill_config
from depthkd_core.models import build_model, load_teacher
from depthkd_core.train.run_cli import add_run_arguments, run_from_args
from depthkd_core.train.supervised import build_datasets
from depthkd_core.train.trainer import Trainer, seed_everything


class IndexOnly(Dataset):
    """Batches for methods that make their own images: just ``{"index": i}``."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index)}


def build_method(cfg: DistillConfig) -> tuple[DistillMethod, torch.nn.Module]:
    """(method, student): the teacher loaded, the student built from ``cfg.model`` at ``cfg.seed``."""
    method_cls = METHODS.get(cfg.method)
    teacher = load_teacher(cfg.teacher, device=cfg.device, output=cfg.teacher_output,
                           differentiable=method_cls.teacher_gradients)
    seed_everything(cfg.seed)  # identical student (and G) initial weights for a given seed
    student = build_model(cfg.model)
    return method_cls(teacher, student, cfg), student


def distill(cfg: DistillConfig) -> Path:
    """Distil ``cfg.teacher`` into ``cfg.model`` with ``cfg.method``; return out_dir/final.pt."""
    method, student = build_method(cfg)
    # the saved config lists every method option, defaults included
    cfg = replace(cfg, method_kwargs=asdict(method.options))
    if method.uses_data:
        train_set, _ = build_datasets(cfg.data)
    else:
        # epochs mean nothing without data; 64 batches keep one per process under torchrun
        train_set = IndexOnly(cfg.optim.batch_size * 64)
    trainer = Trainer(student, method.step, train_set, cfg,
                      extra_optimizers=method.extra_optimizers(),
                      extra_modules=method.extra_modules())
    return trainer.fit()


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "config/distill/", "method_kwargs.alpha=1e-2 teacher=t.pt")


def run_cli(args: argparse.Namespace) -> int:
    return run_from_args(args, load_distill_config, distill)
