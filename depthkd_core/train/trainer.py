"""The one training loop every method uses.

A method supplies ``step_fn(model, batch) -> {name: loss}``; the trainer
back-propagates ``"loss"`` into the model's optimiser and each extra loss into
its own optimiser, advances the schedules, and handles progress (tqdm),
TensorBoard, validation, checkpoints, exact resume, seeding and torchrun/DDP.

Checkpoints use the models format (``save_checkpoint(path, model, model_cfg,
**extra)``, written atomically) with the optimiser, scheduler, extra-module and
RNG states in ``extra``, so any ``ckpt_*.pt`` is also a loadable model.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from depthkd_core.config import save_config
from depthkd_core.models import load_checkpoint, save_checkpoint
from depthkd_core.train.config import OptimConfig, TrainConfig

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, dict[str, Any]], dict[str, Tensor]]
MAIN = "loss"
_CKPT = re.compile(r"^ckpt_(\d+)\.pt$")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; prefer deterministic kernels (warn where none exist)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> dict[str, Any]:
    """All RNG states as plain types and tensors (loadable with ``weights_only``)."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(),
                                             "pos": int(np_state["state"]["pos"])}}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``; accepts the lists a checkpoint stores for tuples."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.asarray(np_state["state"]["key"], np.uint32),
                                               "pos": np_state["state"]["pos"]}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(params: Any, cfg: OptimConfig) -> Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` is ``prefix`` or under it, by whole dotted components:
    ``encoder.layers.1`` names layer 1, not layers 10 to 13; "" names everything."""
    stem = prefix.rstrip(".")
    return not stem or name == stem or name.startswith(stem + ".")


def trainable_parameters(model: nn.Module, frozen: tuple[str, ...]) -> list[nn.Parameter]:
    """``model``'s parameters except those named under a ``frozen`` prefix, which stop
    taking gradients; ValueError for a prefix that names none (a typo would train all)."""
    named = list(model.named_parameters())
    for prefix in frozen:
        if not any(_under(name, prefix) for name, _ in named):
            raise ValueError(f"optim.frozen: no parameter of the model starts with '{prefix}'")
    trainable = []
    for name, param in named:
        if any(_under(name, prefix) for prefix in frozen):
            param.requires_grad_(False)
        else:
            trainable.append(param)
    if not trainable:
        raise ValueError(f"optim.frozen {list(frozen)} leaves no parameter to train")
    return trainable


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, max_steps: int) -> LRScheduler | None:
    if cfg.scheduler == "cosine":
        return CosineAnnealingLR(optimizer, T_max=max_steps)
    if cfg.scheduler == "step":
        return StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Step checkpoints in ``out_dir``, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt_*.pt")
             if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return (dist.get_rank() if world > 1 else 0), world, dev


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy/random would be forked copies
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Runs ``step_fn`` for ``cfg.max_steps`` optimiser steps.

    model: the network checkpointed with ``cfg.model`` (DDP-wrapped under torchrun).
    extra_optimizers: ``{loss name: optimiser}``; each steps on its own loss,
        before the main step, and is scheduled and checkpointed like the main one.
        So the main loss must not back-propagate into an extra optimiser's
        parameters (already stepped in place): detach e.g. a generator's images
        in the student's loss, as Algorithm 1 of the data-free paper does.
    extra_modules: modules besides ``model`` whose weights go into checkpoints.
    config_to_save: dataclass written as ``config.yaml`` and into checkpoints
        (default ``cfg``).
    """

    def __init__(self, model: nn.Module, step_fn: StepFn, train_set: Dataset, cfg: TrainConfig,
                 val_set: Dataset | None = None,
                 extra_optimizers: dict[str, Optimizer] | None = None,
                 extra_modules: dict[str, nn.Module] | None = None,
                 config_to_save: Any = None) -> None:
        self.rank, self.world, self.device = _init_distributed(cfg.device)
        seed_everything(cfg.seed + self.rank)
        self.cfg, self.step_fn, self.train_set, self.val_set = cfg, step_fn, train_set, val_set
        self.out_dir = Path(cfg.out_dir)
        self.config_to_save = cfg if config_to_save is None else config_to_save
        self.model = model.to(self.device)
        # before DDP wraps the model: it registers its gradient hooks on the parameters
        # that require gradients when it is built
        trainable = trainable_parameters(self.model, cfg.optim.frozen)
        self.wrapped: nn.Module = self.model
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        self.extra_modules = {k: m.to(self.device) for k, m in (extra_modules or {}).items()}
        extra_optimizers = dict(extra_optimizers or {})
        if MAIN in extra_optimizers:
            raise ValueError(f"extra_optimizers may not use the main loss name '{MAIN}'")
        # extras first: a main step may not change weights an extra loss still needs
        self.optimizers = {**extra_optimizers,
                           MAIN: build_optimizer(trainable, cfg.optim)}
        self.schedulers = {name: s for name, opt in self.optimizers.items()
                           if (s := build_scheduler(opt, cfg.optim, cfg.max_steps)) is not None}
        self.per_epoch = len(train_set) // self.world // cfg.optim.batch_size
        if self.per_epoch == 0:
            raise ValueError(f"dataset has {len(train_set)} samples, fewer than one batch of "
                             f"{cfg.optim.batch_size} per process ({self.world} processes)")
        self.step = 0

    # -- data ---------------------------------------------------------------
    def _batches(self, start: int) -> Iterator[dict[str, Any]]:
        """Endless batches; epoch e shuffles with seed + e, so a resume replays the same order."""
        epoch, skip = divmod(start, self.per_epoch)
        bs = self.cfg.optim.batch_size
        while True:
            sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank,
                                         shuffle=True, seed=self.cfg.seed, drop_last=True)
            sampler.set_epoch(epoch)
            # a private generator keeps DataLoader from drawing on the global torch RNG
            loader = DataLoader(self.train_set, batch_size=bs, sampler=list(sampler)[skip * bs:],
                                num_workers=self.cfg.data.num_workers, drop_last=True,
                                worker_init_fn=_seed_worker,
                                generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            for batch in loader:
                yield {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v
                       for k, v in batch.items()}
            epoch, skip = epoch + 1, 0

    # -- one step -----------------------------------------------------------
    def _update(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        losses = self.step_fn(self.wrapped, batch)
        missing = sorted(set(self.optimizers) - set(losses))
        if missing:
            raise ValueError(f"step_fn returned {sorted(losses)}; missing loss(es) {missing}")
        names = list(self.optimizers)
        for i, name in enumerate(names):
            if not torch.isfinite(losses[name].detach()).all():
                raise FloatingPointError(f"loss '{name}' is not finite at step {self.step + 1}")
            optimizer = self.optimizers[name]
            optimizer.zero_grad(set_to_none=True)
            losses[name].backward(retain_graph=i < len(names) - 1)
            if self.cfg.optim.grad_clip is not None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            optimizer.step()
        for scheduler in self.schedulers.values():
            scheduler.step()
        return {k: v.detach() for k, v in losses.items()}

    # -- checkpoints ----------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        return {"step": self.step, "rng": rngs, "config": asdict(self.config_to_save),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "modules": {k: m.state_dict() for k, m in self.extra_modules.items()}}

    def _checkpoint(self) -> None:
        state = self._state()  # collective under DDP: every rank takes part
        if self.rank != 0:
            return
        save_checkpoint(self.out_dir / f"ckpt_{self.step:07d}.pt", self.model, self.cfg.model, **state)
        for old in checkpoints(self.out_dir)[:-self.cfg.keep_checkpoints]:
            old.unlink()

    def _resume(self) -> None:
        found = checkpoints(self.out_dir)
        if not self.cfg.resume:
            if found:
                raise ValueError(f"{self.out_dir} already holds checkpoints ({found[-1].name}); "
                                 "resume, or choose another output directory")
            return
        if not found:
            log.warning("resume: no checkpoint in %s, starting from step 0", self.out_dir)
            return
        net, _, extra = load_checkpoint(found[-1])
        self.model.load_state_dict(net.state_dict())
        for name, module in self.extra_modules.items():
            module.load_state_dict(extra["modules"][name])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(extra["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(extra["schedulers"][name])
        rngs = extra["rng"]
        set_rng_state(rngs[self.rank] if self.rank < len(rngs) else rngs[0])
        self.step = int(extra["step"])
        log.info("resumed from %s at step %d", found[-1], self.step)

    # -- logging --------------------------------------------------------------
    def _log(self, writer: SummaryWriter, losses: dict[str, Tensor], bar: tqdm) -> None:
        values = {name: float(v) for name, v in losses.items()}
        for name, value in values.items():
            writer.add_scalar(f"train/{name}", value, self.step)
        for name, optimizer in self.optimizers.items():
            tag = "lr" if name == MAIN else f"lr/{name}"
            writer.add_scalar(tag, optimizer.param_groups[0]["lr"], self.step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})

    def _validate(self, writer: SummaryWriter) -> None:
        from depthkd_core.evaluate.report import evaluate_model

        metrics = evaluate_model(self.model, self.val_set, max_depth=self.cfg.model.max_depth,
                                 batch_size=self.cfg.optim.batch_size, progress=False)
        for name, value in metrics.items():
            if name != "count":
                writer.add_scalar(f"val/{name}", value, self.step)

    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def fit(self) -> Path:
        """Train to ``cfg.max_steps``; return the final model checkpoint ``out_dir/final.pt``."""
        self._resume()
        writer = None
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config_to_save, self.out_dir / "config.yaml")
            writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1)
        batches = self._batches(self.step)
        self.wrapped.train()
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train",
                   disable=self.rank != 0, dynamic_ncols=True)
        while self.step < self.cfg.max_steps:
            losses = self._update(next(batches))
            self.step += 1
            bar.update(1)
            if writer is not None and (self._due(self.cfg.log_every) or self.step == 1):
                self._log(writer, losses, bar)
            if writer is not None and self.val_set is not None and self._due(self.cfg.eval_every):
                self._validate(writer)
            if self._due(self.cfg.ckpt_every) or self.step == self.cfg.max_steps:
                self._checkpoint()
        bar.close()
        final = self.out_dir / "final.pt"
        if writer is not None:
            writer.close()
            save_checkpoint(final, self.model, self.cfg.model, step=self.step,
                            config=asdict(self.config_to_save))
        return final
