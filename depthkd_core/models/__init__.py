"""Depth networks (timm encoder + decoder + head), checkpoints and teachers."""

from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .config import ModelConfig
from .depthnet import MODELS, DepthNet, build_model
from .fastdepth import FastDepthNet
from .heads import HEADS, dpm_centers
from .hf_teacher import HuggingFaceTeacher
from .teacher_base import Teacher
from .teachers import (CachedTeacher, CheckpointTeacher, OnnxTeacher, OnnxTorchTeacher, TorchScriptTeacher,
                       load_teacher)

__all__ = [
    "ModelConfig", "MODELS", "HEADS", "DepthNet", "FastDepthNet", "build_model", "dpm_centers",
    "save_checkpoint", "load_checkpoint", "read_checkpoint",
    "Teacher", "CheckpointTeacher", "TorchScriptTeacher", "OnnxTeacher", "OnnxTorchTeacher", "HuggingFaceTeacher",
    "CachedTeacher", "load_teacher",
]
