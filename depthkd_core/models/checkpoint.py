"""depthkd checkpoints: model config + weights + extras, safe to load.

A checkpoint is ``{"format", "model_config", "state_dict", **extra}`` holding
only tensors and plain containers/primitives, so ``torch.load(weights_only=True)``
reads it without running pickled code.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_open
from ..config import from_dict
from .config import ModelConfig
from .depthnet import DepthNet, build_model

FORMAT = "depthkd-checkpoint-v1"
RESERVED = ("format", "model_config", "state_dict")


def _plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, so weights_only loading accepts them."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_checkpoint(path: str | Path, model: nn.Module, model_cfg: ModelConfig, **extra: Any) -> Path:
    """Write atomically (temp file in the same folder + os.replace) and return the path.

    ``extra`` (step, optimizer state, train config...) must be tensors,
    primitives, containers or dataclasses of those.
    """
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} are reserved in a checkpoint")
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    payload = {"format": FORMAT, "model_config": _plain(model_cfg),
               "state_dict": module.state_dict(), **{k: _plain(v) for k, v in extra.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        torch.save(payload, f)
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict, validated; ValueError if corrupt or not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # Garbage bytes trigger pickle-protocol warnings before the real error below.
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError/...
        raise ValueError(f"corrupt checkpoint {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a depthkd checkpoint: {path} (no format key '{FORMAT}')")
    missing = [k for k in ("model_config", "state_dict") if k not in data]
    if missing:
        raise ValueError(f"corrupt checkpoint {path}: missing {missing}")
    return data


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[DepthNet, ModelConfig, dict[str, Any]]:
    """Rebuild the model from its stored config and load the weights strictly."""
    data = read_checkpoint(path, map_location)
    cfg = from_dict(ModelConfig, data["model_config"])
    # The weights are all here: never re-read the encoder's original pretrained file.
    model = build_model(dataclasses.replace(cfg, pretrained=None))
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"corrupt checkpoint {path}: weights do not fit its model_config: {exc}") from None
    model.to(map_location)
    extra = {k: v for k, v in data.items() if k not in RESERVED}
    return model, cfg, extra
