"""Teacher loaders: a checkpoint, TorchScript, ONNX or Hugging Face folder behind the
one call of ``teacher_base.Teacher``, ``teacher(images) -> depth``.

Torch teachers are frozen (eval, no parameter grads) but keep the graph
to their input, so methods that need d(teacher)/d(image) (DFAD) can use them;
wrap calls in ``torch.no_grad()`` otherwise.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_open
from .checkpoint import load_checkpoint
from .teacher_base import Teacher, freeze


class CheckpointTeacher(Teacher):
    """A depthkd checkpoint (metric DepthNet)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        model, cfg, _ = load_checkpoint(path, map_location=device)
        self.module = freeze(model)
        self.name = f"{Path(path).name} ({cfg.name}/{cfg.encoder}/{cfg.head})"
        self.input_size = model.encoder.fixed_size

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zips holding ``constants.pkl`` and ``code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


class TorchScriptTeacher(Teacher):
    """A TorchScript module taking RGB [0,1] (B,3,H,W), returning depth (B,[1,]h,w)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", is_metric: bool = True,
                 input_size: tuple[int, int] | None = None, is_inverse: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"TorchScript teacher not found: {path}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            try:
                module = torch.jit.load(str(path), map_location=device)
            except Exception as exc:
                raise ValueError(f"not a TorchScript model {path}: {exc}") from None
        self.module = freeze(module)
        self.name, self.is_metric, self.input_size = path.name, is_metric, input_size
        self.is_inverse = is_inverse

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


class OnnxTeacher(Teacher):
    """An ONNX depth model through ONNX Runtime: metric, no gradients, no module."""

    differentiable = False

    def __init__(self, path: str | Path, providers: str = "auto", is_metric: bool = True,
                 is_inverse: bool = False) -> None:
        from ..runtime import OnnxDepthModel

        self.model = OnnxDepthModel(path, providers)
        self.name, self.is_metric, self.is_inverse = Path(path).name, is_metric, is_inverse
        self.input_size = self.model.input_size

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(self.model.predict_batch(x)).to(images.device)


class OnnxTorchTeacher(Teacher):
    """An ONNX depth model converted to a torch module (``onnx_torch``): gradients flow to
    the input, for methods that train through the teacher (DFAD). Frozen like every
    torch teacher; folded BatchNorm means no running statistics."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", is_metric: bool = True,
                 is_inverse: bool = False) -> None:
        from ..runtime import OnnxDepthModel
        from .onnx_torch import onnx_to_torch

        # the runtime reads the input size (and refuses a file that is no depth model)
        self.input_size = OnnxDepthModel(path, "cpu").input_size
        self.module = freeze(onnx_to_torch(path).to(device))
        self.name, self.is_metric, self.is_inverse = Path(path).name, is_metric, is_inverse

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


class CachedTeacher(Teacher):
    """Caches a teacher's depth per image on disk (``<hash>.npy``).

    The key hashes the teacher name, the image shape and its float32 bytes, so
    a repeated image hits regardless of batch composition. Cached outputs carry
    no graph (differentiable False); BN hooks on ``module`` see only misses.
    """

    differentiable = False

    def __init__(self, teacher: Teacher, cache_dir: str | Path) -> None:
        self.teacher = teacher
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.is_metric, self.is_inverse = teacher.name, teacher.is_metric, teacher.is_inverse
        self.module, self.input_size = teacher.module, teacher.input_size
        self.hits = self.misses = 0

    def _key(self, image: torch.Tensor) -> Path:
        data = image.detach().to("cpu", torch.float32).contiguous().numpy()
        digest = hashlib.sha256(f"{self.teacher.name}|{data.shape}|".encode())
        digest.update(data.tobytes())
        return self.cache_dir / f"{digest.hexdigest()[:40]}.npy"

    def _store(self, path: Path, depth: np.ndarray) -> None:
        with atomic_open(path) as f:
            np.save(f, depth)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        keys = [self._key(img) for img in images]
        cached = [np.load(k) if k.is_file() else None for k in keys]
        todo = [i for i, c in enumerate(cached) if c is None]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            with torch.no_grad():
                fresh = self.teacher(images[todo]).to("cpu", torch.float32).numpy()
            for i, depth in zip(todo, fresh):
                self._store(keys[i], depth)
                cached[i] = depth
        return torch.from_numpy(np.stack(cached)).to(images.device)


# What a teacher's output is, for files that cannot say (ONNX, TorchScript).
TEACHER_OUTPUTS = ("auto", "metric", "relative", "relative_inverse")


def output_flags(output: str) -> tuple[bool | None, bool]:
    """(is_metric, is_inverse) for a ``TEACHER_OUTPUTS`` value; is_metric None = the loader's default."""
    if output not in TEACHER_OUTPUTS:
        raise ValueError(f"teacher output must be one of {TEACHER_OUTPUTS}, got '{output}'")
    return (None if output == "auto" else output == "metric"), output == "relative_inverse"


def load_teacher(source: str | Path, device: str | torch.device = "cpu", providers: str = "auto",
                 is_metric: bool | None = None, cache_dir: str | Path | None = None,
                 output: str = "auto", differentiable: bool = False) -> Teacher:
    """Open a teacher by path: Hugging Face folder (config.json), ``.onnx``,
    TorchScript archive or depthkd checkpoint; ``cache_dir`` wraps it in a
    CachedTeacher. ``is_metric`` or ``output`` (``TEACHER_OUTPUTS``: relative,
    relative_inverse = disparity, e.g. a MiDaS export) say what an ONNX/TorchScript
    file predicts; checkpoints are metric and Hugging Face folders say so themselves.
    ``differentiable``: an ONNX file is converted to torch (OnnxTorchTeacher) instead
    of running in ONNX Runtime (faster, no gradients)."""
    flag_metric, is_inverse = output_flags(output)
    is_metric = flag_metric if is_metric is None else is_metric
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"teacher not found: {path}")
    onnx = not path.is_dir() and path.suffix.lower() == ".onnx"
    torchscript = not path.is_dir() and not onnx and is_torchscript(path)
    if output != "auto" and not (onnx or torchscript):
        raise ValueError(f"teacher output '{output}' applies to ONNX/TorchScript files only; "
                         f"{path} says what it predicts itself (checkpoints are metric, "
                         "Hugging Face folders name it in config.json): use output 'auto'")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"teacher folder {path} has no config.json "
                             "(expected a Hugging Face depth-estimation model folder)")
        from .hf_teacher import HuggingFaceTeacher

        teacher: Teacher = HuggingFaceTeacher(path, device=device)
    elif onnx and differentiable:
        teacher = OnnxTorchTeacher(path, device, True if is_metric is None else is_metric, is_inverse)
    elif onnx:
        teacher = OnnxTeacher(path, providers, True if is_metric is None else is_metric, is_inverse)
    elif torchscript:
        teacher = TorchScriptTeacher(path, device, True if is_metric is None else is_metric,
                                     is_inverse=is_inverse)
    else:
        try:
            teacher = CheckpointTeacher(path, device)
        except ValueError as exc:
            raise ValueError(f"cannot load teacher {path}: tried a Hugging Face folder, ONNX "
                             f"(.onnx), TorchScript (not a TorchScript archive) and a depthkd "
                             f"checkpoint ({exc})") from None
    return CachedTeacher(teacher, cache_dir) if cache_dir is not None else teacher
