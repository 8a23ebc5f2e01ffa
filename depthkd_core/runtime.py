"""ONNX Runtime sessions for depth models (numpy + OpenCV + onnxruntime only).

The live ROS node imports this module, so it must never import torch.
Provider choice "auto" tries TensorRT, then CUDA, then CPU, and accepts a GPU
provider only if the session really runs on it: onnxruntime-gpu on a machine
without a working CUDA silently falls back to CPU otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from depthkd_core.imaging import resize_rgb, rgb_to_chw

LOG = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
QUIET = 3  # ORT severity "error": hides the warnings of a failed GPU probe


def _options(threads: int | None, severity: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = severity
    # ORT's worker threads busy-wait after every run by default. On a robot's few shared
    # cores that spin takes CPU from the ROS executor, DDS and the other nodes: measured
    # on 2 loaded cores, depth_node's CPU per frame fell from 22 to 12 ms without it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"intra_op_num_threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
    return opts


def _provider_list(key: str, trt_cache_dir: str | None) -> list:
    if key == "cpu":
        return ["CPUExecutionProvider"]
    chain: list = [PROVIDERS[key], "CPUExecutionProvider"]
    if key == "tensorrt":
        chain.insert(1, "CUDAExecutionProvider")
        if trt_cache_dir is not None:
            # Without a cache TensorRT rebuilds its engine (minutes) on every start.
            Path(trt_cache_dir).mkdir(parents=True, exist_ok=True)
            chain[0] = (PROVIDERS[key], {"trt_engine_cache_enable": True,
                                         "trt_engine_cache_path": str(trt_cache_dir)})
    return chain


def _try(path: Path, key: str, threads: int | None, trt_cache_dir: str | None
         ) -> tuple[ort.InferenceSession | None, str]:
    """A session on provider ``key``, or (None, reason it is unusable)."""
    name = PROVIDERS[key]
    if name not in ort.get_available_providers():
        return None, f"{name} is not in this onnxruntime build ({ort.get_available_providers()})"
    severity = 2 if key == "cpu" else QUIET
    try:
        session = ort.InferenceSession(str(path), sess_options=_options(threads, severity),
                                       providers=_provider_list(key, trt_cache_dir))
    except Exception as exc:  # ORT raises its own Fail/InvalidProtobuf/RuntimeException types
        if key == "cpu":
            raise ValueError(f"not a valid ONNX model {path}: {exc}") from None
        return None, f"{name} failed to create a session: {exc}"
    if session.get_providers()[0] != name:
        return None, f"{name} is installed but unusable here (session fell back to " \
                     f"{session.get_providers()})"
    return session, ""


def create_session(path: str | Path, providers: str = "auto", intra_op_num_threads: int | None = None,
                   trt_cache_dir: str | None = None) -> tuple[ort.InferenceSession, str]:
    """Open ``path`` on "auto" (TensorRT -> CUDA -> CPU), "cpu", "cuda" or "tensorrt".

    Returns the session and the provider actually used. An explicit GPU
    provider that is unusable raises ValueError with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    key = providers.lower()
    if key != "auto" and key not in PROVIDERS:
        raise ValueError(f"providers must be 'auto', 'cpu', 'cuda' or 'tensorrt', got '{providers}'")
    reasons = []
    for candidate in (AUTO_ORDER if key == "auto" else (key,)):
        session, reason = _try(path, candidate, intra_op_num_threads, trt_cache_dir)
        if session is not None:
            chosen = PROVIDERS[candidate]
            LOG.info("ONNX Runtime runs %s on %s", path.name, chosen)
            if reasons:
                LOG.debug("providers skipped: %s", "; ".join(reasons))
            return session, chosen
        if key != "auto":
            raise ValueError(f"provider '{providers}' unusable for {path}: {reason}")
        reasons.append(reason)
    raise AssertionError("unreachable: the CPU provider always yields a session or raises")


def _fixed_size(shape: list) -> tuple[int, int] | None:
    h, w = shape[-2], shape[-1]
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


class OnnxDepthModel:
    """A depth model in ONNX: input (B,3,H,W) RGB [0,1], output depth (B,1,h,w) or (B,h,w)."""

    def __init__(self, path: str | Path, providers: str = "auto",
                 intra_op_num_threads: int | None = None, trt_cache_dir: str | None = None) -> None:
        self.path = Path(path)
        self.session, self.provider = create_session(self.path, providers, intra_op_num_threads,
                                                     trt_cache_dir)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{self.path}: expected one (B,3,H,W) input, got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        self.input_size: tuple[int, int] | None = _fixed_size(inputs[0].shape)
        batch = inputs[0].shape[0]
        self.fixed_batch: int | None = batch if isinstance(batch, int) else None

    def predict_batch(self, x: np.ndarray) -> np.ndarray:
        """(B,3,H,W) float32 in [0,1] -> depth (B,1,h,w) float32."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (B,3,H,W), got shape {x.shape}")
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path.name} takes {self.input_size} images, got {tuple(x.shape[2:])}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fixed_batch is not None and self.fixed_batch != x.shape[0]:
            if self.fixed_batch != 1:
                raise ValueError(f"{self.path.name} takes batches of {self.fixed_batch}, got {x.shape[0]}")
            outs = [self._run(x[i:i + 1]) for i in range(x.shape[0])]
            return np.concatenate(outs, axis=0)
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: x})[0]
        if out.ndim == 3:
            out = out[:, None]
        if out.ndim != 4 or out.shape[1] != 1:
            raise ValueError(f"{self.path.name}: output must be (B,1,h,w) or (B,h,w), got {out.shape}")
        return out.astype(np.float32, copy=False)

    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.input_size is not None:
            return self.input_size
        # Dynamic models still need the encoder's stride 32.
        return max(32, round(height / 32) * 32), max(32, round(width / 32) * 32)

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> depth HxW float32 at the model's input size."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
        rgb = resize_rgb(rgb, *self._target_size(*rgb.shape[:2]))
        x = rgb_to_chw(rgb)[None]
        return self.predict_batch(x)[0, 0]
