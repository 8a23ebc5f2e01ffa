"""`depthkd make-student`: a deployable student from a teacher file, end to end, with its provenance.

    depthkd make-student --config config/student/fastdepth.yaml [--install depthkd_ros/models]

simulate the transfer images -> distil (a config/distill/*.yaml run, resumed when its
folder holds checkpoints) -> export ONNX at the deployment size with a parity check ->
judge on held-out simulated frames (agreement with the teacher, accuracy against the
rendered depth) -> ``student.onnx``, ``student.pt`` and ``student.json`` (provenance:
teacher file and sha256, method, data, steps, command, date, figures) in ``out_dir``;
``--install DIR`` copies the three there atomically. Only simulated images are read:
real frames judge a student (``depthkd bench-real``), they never make one.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from torch import nn

from depthkd_core.atomic import atomic_open
from depthkd_core.bench.cache import file_sha256
from depthkd_core.config import load_config
from depthkd_core.imaging import rgb_to_chw
from depthkd_core.models.config import FASTDEPTH_DECODER_STAGES, ModelConfig
from depthkd_core.models.interpolate import interpolate_weights

ARTIFACTS = ("student.onnx", "student.pt", "student.json")
QUANTIZE = ("none", "int8")
FP32_ARTIFACT = "student_fp32.onnx"  # beside an int8 student.onnx


@dataclass
class StudentRecipe:
    """teacher: the file to distil (ONNX, TorchScript, checkpoint, HF folder).
    distill: the config/distill/*.yaml run; overrides: dotted ``key=value`` on it.
    init_from_teacher: the student starts from the teacher file's weights
    (``model.pretrained`` = teacher; a FastDepth student of a FastDepth teacher).
    train: false skips distillation: the initial student is exported as it is (with
    init_from_teacher, the teacher at the student's resolution: the baseline).
    prune_ratios: {stride: fraction} (with init_from_teacher, a FastDepth student): the
    student is the teacher with each layer at that feature stride (2..32) cut to that
    fraction of its channels (rounded to ``prune_multiple``; a stride not given keeps all),
    the channels that pass on most kept and the pointwise convs refitted to the teacher's outputs, on
    the first ``prune_images`` transfer frames (models/prune.py); {} = no pruning. A
    student that cuts its decoder (``model.decoder_stages``, an override) starts,
    likewise, from the teacher cut after that stage, its new output conv fitted on the
    same frames (``cut_decoder``).
    prune_multiple: the channel multiple pruned widths round to: ONNX Runtime's CPU
    convolutions work on blocks of channels (NCHWc: 16 wide with AVX-512, 8 with AVX2),
    and a width between two multiples costs as much as the next one up.
    sim_*: the transfer set (style, or styles joined by "+", frames, seed, rendered
    size); val_*: held-out simulated frames (another seed) that judge the student before
    it ships. judge_styles: styles whose own held-out frames also judge it, one by one
    (agreement on a look it was not trained on: the simulator's stand-in for a camera it
    never saw; ``held_out_by_style`` in the provenance).
    weight_interpolation: alphas in (0, 1) (with init_from_teacher and train). Besides
    the distilled student (alpha 1), the students ``(1 - alpha) * start + alpha *
    distilled`` on the line from its starting weights (models/interpolate.py, WiSE-FT) are
    judged on the held-out simulated frames, and the one with the best mean agreement over
    the judged looks (``judge_styles``, else the transfer look's held-out frames) ships;
    every candidate's figures are in the provenance. [] = the distilled student.
    export_height/width: the ONNX input size (the live node's model input).
    quantize: "int8" ships the exported student quantised (export/quantize.py: int8
    weights per channel, uint8 activations whose ranges come from ``quant_frames`` transfer
    frames, evenly spaced) and judges every candidate so, as it runs; its fp32 graph stays
    in out_dir as ``student_fp32.onnx``. "none" ships fp32."""

    teacher: str
    distill: str
    overrides: list[str] = field(default_factory=list)
    init_from_teacher: bool = False
    prune_ratios: dict[int, float] = field(default_factory=dict)
    prune_images: int = 64
    prune_multiple: int = 8
    train: bool = True
    sim_style: str = "target"
    sim_frames: int = 2000
    sim_seed: int = 1
    sim_height: int = 240
    sim_width: int = 320
    sim_workers: int = 2
    val_frames: int = 100
    val_seed: int = 1000
    judge_styles: list[str] = field(default_factory=list)
    weight_interpolation: list[float] = field(default_factory=list)
    export_height: int = 96
    export_width: int = 128
    quantize: str = "none"
    quant_frames: int = 64
    out_dir: str = "runs/student/fastdepth"

    def __post_init__(self) -> None:
        if self.sim_frames < 1 or self.val_frames < 1:
            raise ValueError(f"sim_frames and val_frames must be >= 1, got {self.sim_frames}, "
                             f"{self.val_frames}")
        if self.val_seed == self.sim_seed:
            raise ValueError("val_seed must differ from sim_seed: held-out frames are other frames")
        self.prune_ratios = {int(k): float(v) for k, v in self.prune_ratios.items()}
        if any(not 0.0 < v <= 1.0 for v in self.prune_ratios.values()):
            raise ValueError(f"prune_ratios must be in (0, 1], got {self.prune_ratios}")
        if self.prune_ratios and not self.init_from_teacher:
            raise ValueError("prune_ratios prune the teacher's weights: they need "
                             "init_from_teacher: true")
        if self.prune_images < 1:
            raise ValueError(f"prune_images must be >= 1, got {self.prune_images}")
        if self.prune_multiple < 1:
            raise ValueError(f"prune_multiple must be >= 1, got {self.prune_multiple}")
        self.weight_interpolation = [float(a) for a in self.weight_interpolation]
        if any(not 0.0 < a < 1.0 for a in self.weight_interpolation):
            raise ValueError(f"weight_interpolation alphas must be in (0, 1), got "
                             f"{self.weight_interpolation}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {QUANTIZE}, got {self.quantize!r}")
        if self.quant_frames < 1:
            raise ValueError(f"quant_frames must be >= 1, got {self.quant_frames}")
        if self.weight_interpolation and not (self.init_from_teacher and self.train):
            raise ValueError("weight_interpolation blends the teacher's weights the student "
                             "started from with the distilled ones: it needs "
                             "init_from_teacher: true and train: true")


def simulated_set(style: str, n: int, seed: int, height: int, width: int, workers: int,
                  root: Path = Path("runs/data")) -> Path:
    """The folder of ``n`` frames of ``style`` (rendered once; a complete folder is reused)."""
    from depthkd_core.data.simulator import write_dataset

    out = root / f"{style}_s{seed}_n{n}_{height}x{width}"
    meta = out / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()).get("n") == n:
        return out
    # meta.json is written last: a folder without it is an interrupted render
    return write_dataset(out, style, n, height, width, seed, workers)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def sim_figures(student_onnx: Path, teacher: str, sets: dict[str, Path], height: int,
                width: int) -> dict[str, dict[str, float]]:
    """Per named folder of held-out frames: agreement with the teacher and accuracy against
    the rendered depth (bench-real's ``judge``; both models loaded once)."""
    from depthkd_core.evaluate.judge import RealSet, frames_of, judge
    from depthkd_core.models.teachers import load_teacher

    student, reference = load_teacher(student_onnx), load_teacher(teacher)
    return {name: judge(student, reference, frames_of(RealSet(name, "sim", str(data)), height, width),
                        0.1, 10.0)
            for name, data in sets.items()}


def command_line(config: Path | str, overrides: list[str], install: Path | None = None) -> str:
    """The `depthkd make-student` call that runs ``config`` with ``overrides`` (provenance)."""
    return " ".join(["depthkd make-student --config", str(config), *overrides]
                    + ([] if install is None else ["--install", str(install)]))


def make_student(recipe: StudentRecipe, command: str) -> Path:
    """Run the recipe; returns ``out_dir`` holding the three ARTIFACTS."""
    from depthkd_core.data import build_reader
    from depthkd_core.methods.config import load_distill_config
    from depthkd_core.methods.engine import distill
    from depthkd_core.models import build_model, load_checkpoint, save_checkpoint
    from depthkd_core.train.trainer import checkpoints

    start = time.monotonic()
    out = Path(recipe.out_dir)
    train = simulated_set(recipe.sim_style, recipe.sim_frames, recipe.sim_seed, recipe.sim_height,
                          recipe.sim_width, recipe.sim_workers)
    val = simulated_set(recipe.sim_style, recipe.val_frames, recipe.val_seed, recipe.sim_height,
                        recipe.sim_width, recipe.sim_workers)
    overrides = [*recipe.overrides, f"teacher={recipe.teacher}", f"data.root={train}"]
    if recipe.init_from_teacher:
        overrides.append(f"model.pretrained={recipe.teacher}")
    cfg = load_distill_config(recipe.distill, overrides)
    cfg = replace(cfg, out_dir=str(out / "distill"), resume=True)
    if recipe.init_from_teacher and (recipe.prune_ratios or cfg.model.cuts_decoder):
        cfg = replace(cfg, model=pruned_teacher(cfg.model, recipe, train, out / "pruned.pt"))
    resumed = bool(checkpoints(Path(cfg.out_dir)))
    if recipe.train:
        final = distill(cfg)
    else:
        final = save_checkpoint(out / "untrained.pt", build_model(cfg.model), cfg.model, step=0)
    model, model_cfg, extra = load_checkpoint(final)
    frames = build_reader("sim", val)
    images = [frames[i].rgb for i in range(min(4, len(frames)))]
    held_out = {style: simulated_set(style, recipe.val_frames, recipe.val_seed, recipe.sim_height,
                                     recipe.sim_width, recipe.sim_workers)
                for style in recipe.judge_styles}
    calibration = calibration_images(train, recipe)
    interpolation = None
    if recipe.weight_interpolation:
        start_model = build_model(cfg.model)  # the weights distillation started from
        alpha, interpolation = choose_interpolation(
            start_model, model, recipe, held_out or {"held_out": val}, images,
            calibration, out / "interpolation")
        model.load_state_dict(interpolate_weights(start_model, model, alpha))
        final = save_checkpoint(out / "interpolated.pt", model, model_cfg, step=extra["step"],
                                interpolation_alpha=alpha)
    checks = export_student(model, out / "student.onnx", recipe, images, calibration)
    copy_atomic(final, out / "student.pt")
    by_style = sim_figures(out / "student.onnx", recipe.teacher, {"held_out": val, **held_out},
                           recipe.sim_height, recipe.sim_width)
    figures = by_style.pop("held_out")
    provenance = {
        "made_by": "depthkd make-student", "command": command,
        # what the ONNX was exported from (online.supervisor.checkpoint_for reads it)
        "checkpoint": "student.pt",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "teacher": {"file": Path(recipe.teacher).name, "path": recipe.teacher,
                    "sha256": file_sha256(recipe.teacher)},
        "method": cfg.method if recipe.train else None, "loss": cfg.loss,
        "steps": cfg.max_steps if recipe.train else 0,
        "student": {"model": asdict(model_cfg), "onnx_input": [recipe.export_height, recipe.export_width],
                    "onnx_sha256": file_sha256(out / "student.onnx"), **checks},
        "data": {"kind": "simulated only", "style": recipe.sim_style, "frames": recipe.sim_frames,
                 "seed": recipe.sim_seed, "size": [recipe.sim_height, recipe.sim_width]},
        "held_out_sim": {"style": recipe.sim_style, "seed": recipe.val_seed, **figures},
        "held_out_by_style": by_style,
        "weight_interpolation": interpolation,
        "recipe": asdict(recipe), "wall_time_s": round(time.monotonic() - start, 1),
        # a resumed run's wall time leaves out the steps of earlier runs
        "resumed": resumed,
    }
    with atomic_open(out / "student.json", "w") as f:
        f.write(json.dumps(provenance, indent=1) + "\n")
    return out


def calibration_images(train: Path, recipe: StudentRecipe) -> np.ndarray | None:
    """``recipe.quant_frames`` transfer frames, evenly spaced, at the export size as a
    batch (the int8 ranges' calibration set), or None when the recipe ships fp32."""
    from depthkd_core.data import build_reader
    from depthkd_core.export.contract import images_to_batch

    if recipe.quantize == "none":
        return None
    frames = build_reader("sim", train)
    picks = np.linspace(0, len(frames) - 1, min(recipe.quant_frames, len(frames))).round().astype(int)
    return images_to_batch([frames[int(i)].rgb for i in picks], recipe.export_height,
                           recipe.export_width)


def export_student(model: nn.Module, path: Path, recipe: StudentRecipe, check_images: list,
                   calibration: np.ndarray | None) -> dict[str, object]:
    """``model`` exported to ``path`` as it ships: fp32 with the parity check, then with
    ``recipe.quantize`` "int8" quantised, its ranges from ``calibration`` (the fp32 graph
    kept beside it as ``<stem>_fp32.onnx``). The checks' figures, for the provenance."""
    from depthkd_core.export.contract import images_to_batch
    from depthkd_core.export.onnx_export import export_onnx
    from depthkd_core.export.quantize import quantize_int8

    fp32 = path.with_name(f"{path.stem}_fp32{path.suffix}") if recipe.quantize == "int8" else path
    report = export_onnx(model, fp32, recipe.export_height, recipe.export_width,
                         check_images=check_images)
    if not report.passed:
        raise ValueError(f"the exported student disagrees with its checkpoint: {report.summary()}")
    checks: dict[str, object] = {"parity_max_rel": report.max_rel}
    if recipe.quantize == "int8":
        assert calibration is not None
        quant = quantize_int8(fp32, path, calibration,
                              images_to_batch(check_images, recipe.export_height, recipe.export_width))
        if not quant.passed:
            raise ValueError(f"the int8 student disagrees with its fp32 graph: {quant.summary()}")
        checks["quantization"] = {
            "kind": "int8 static (QDQ): weights int8 per channel, activations uint8 per tensor",
            "calibration": f"{quant.calibration_images} transfer frames, min/max",
            "fp32_onnx_sha256": file_sha256(fp32),
            "vs_fp32": {"images": quant.check_images, "max_abs": quant.max_abs,
                        "mean_rel": quant.mean_rel, "agree_delta1": quant.agree_delta1}}
    return checks


def choose_interpolation(start: nn.Module, tuned: nn.Module, recipe: StudentRecipe,
                         judged: dict[str, Path], images: list, calibration: np.ndarray | None,
                         work: Path) -> tuple[float, dict[str, object]]:
    """The alpha among ``recipe.weight_interpolation`` and 1 whose interpolated student
    agrees best with the teacher on ``judged`` (mean agreement delta1 over the sets, each
    student exported, and quantised when the recipe says so, and run as it would ship),
    and every alpha's figures."""
    figures: dict[str, dict[str, float]] = {}
    means: dict[float, float] = {}
    for alpha in sorted({*recipe.weight_interpolation, 1.0}):
        tuned_copy = copy.deepcopy(tuned)
        tuned_copy.load_state_dict(interpolate_weights(start, tuned, alpha))
        onnx = work / f"alpha_{alpha:.3f}.onnx"
        export_student(tuned_copy, onnx, recipe, images, calibration)
        by_set = sim_figures(onnx, recipe.teacher, judged, recipe.sim_height, recipe.sim_width)
        means[alpha] = sum(f["agree_delta1"] for f in by_set.values()) / len(by_set)
        figures[f"{alpha:g}"] = {**{name: f["agree_delta1"] for name, f in by_set.items()},
                                 "mean": means[alpha]}
    best = max(means, key=means.__getitem__)
    return best, {"chosen": best, "judged_on": sorted(judged), "agree_delta1": figures}


def pruned_teacher(model_cfg: ModelConfig, recipe: StudentRecipe, data: Path, path: Path) -> ModelConfig:
    """The student's ModelConfig, starting from ``path``: the teacher (``model_cfg``, which
    imports it, with every decoder stage) pruned to ``recipe.prune_ratios`` and cut to
    ``model_cfg.decoder_stages`` on the first transfer frames, at the student's input
    size. Both are deterministic; an existing ``path`` is reused."""
    import torch

    from depthkd_core.data import build_reader
    from depthkd_core.models import build_model, load_checkpoint, save_checkpoint
    from depthkd_core.models.prune import cut_decoder, prune_fastdepth, widths_by_stride
    from depthkd_core.models.teacher_base import resize

    if model_cfg.name != "fastdepth":
        raise ValueError(f"prune_ratios apply to a fastdepth student, not '{model_cfg.name}'")
    if not path.is_file():
        pruned = build_model(replace(model_cfg, decoder_stages=FASTDEPTH_DECODER_STAGES))
        frames = build_reader("sim", data)
        images = torch.stack([torch.from_numpy(rgb_to_chw(frames[i].rgb))
                              for i in range(min(recipe.prune_images, len(frames)))])
        size = model_cfg.input_size or (recipe.sim_height // 32 * 32, recipe.sim_width // 32 * 32)
        images = resize(images, size)
        if recipe.prune_ratios:
            pruned = prune_fastdepth(pruned, *widths_by_stride(pruned, recipe.prune_ratios,
                                                                recipe.prune_multiple), images)
        if model_cfg.cuts_decoder:
            pruned = cut_decoder(pruned, model_cfg.decoder_stages, images)
        save_checkpoint(path, pruned, pruned.cfg, prune_ratios=recipe.prune_ratios,
                        prune_multiple=recipe.prune_multiple,
                        decoder_stages=model_cfg.decoder_stages, prune_images=len(images))
    _, cfg, _ = load_checkpoint(path)
    return replace(cfg, pretrained=str(path))


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy through a temp file + rename: a reader never sees half a model."""
    with atomic_open(dst, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out)


def install(out: Path, target: Path) -> None:
    """Copy the recipe's artifacts into ``target``; an int8 student's fp32 graph too (for a
    GPU, or a CPU without int8 dot-product instructions), and none left from an earlier one."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:
        copy_atomic(out / name, target / name)
    if (out / FP32_ARTIFACT).is_file():
        copy_atomic(out / FP32_ARTIFACT, target / FP32_ARTIFACT)
    else:
        (target / FP32_ARTIFACT).unlink(missing_ok=True)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="YAML in config/student/")
    parser.add_argument("--install", type=Path, default=None,
                        help="copy student.onnx/.pt/.json here (make student: depthkd_ros/models)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. sim_frames=200 overrides=[max_steps=10]")


def run_cli(args: argparse.Namespace) -> int:
    recipe = load_config(StudentRecipe, args.config, args.overrides)
    out = make_student(recipe, command_line(args.config, args.overrides, args.install))
    summary = json.loads((out / "student.json").read_text())
    print(json.dumps({"out": str(out), "held_out_sim": summary["held_out_sim"],
                      "held_out_by_style": summary["held_out_by_style"],
                      "wall_time_s": summary["wall_time_s"]}, indent=1))
    if args.install is not None:
        install(out, args.install)
        print(f"installed {', '.join(ARTIFACTS)} into {args.install}")
    return 0
