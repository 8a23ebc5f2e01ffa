"""Trainer: determinism, exact resume, checkpoints, TensorBoard; `depthkd` end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from helpers import TINY_FASTDEPTH
from torch import Tensor, nn

from depthkd_core.cli import main
from depthkd_core.data import DepthDataset, render_frame
from depthkd_core.losses import build_loss
from depthkd_core.models import ModelConfig, build_model, load_checkpoint
from depthkd_core.train.config import DataConfig, OptimConfig, TrainConfig, load_train_config
from depthkd_core.train.supervised import supervised_step
from depthkd_core.train.trainer import Trainer, checkpoints, seed_everything, trainable_parameters

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelConfig(encoder="mobilenetv2_050", decoder_channels=(16, 16, 8, 8))


@pytest.fixture(scope="module")
def frames() -> list:
    return [render_frame("sim", seed, 64, 64) for seed in range(10)]


def make_cfg(out_dir: Path, **kw) -> TrainConfig:
    base = dict(data=DataConfig(root="in-memory", height=32, width=32), model=MODEL,
                optim=OptimConfig(batch_size=2, lr=1e-3, scheduler="cosine"), max_steps=6,
                log_every=1, ckpt_every=3, out_dir=str(out_dir))
    return TrainConfig(**{**base, **kw})


class Gain(nn.Module):
    """An extra trainable module, as a method's generator would be."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))


def run(cfg: TrainConfig, frames: list, init_seed: int = 0, val: bool = False) -> tuple[Path, Gain]:
    """Train with an aux loss on an extra module; augmentation draws on torch's RNG."""
    seed_everything(init_seed)
    model, gain = build_model(cfg.model), Gain()
    main_step = supervised_step(build_loss("silog"))

    def step(net: nn.Module, batch: dict) -> dict[str, Tensor]:
        losses = main_step(net, batch)
        noise = torch.rand(())  # consumes the RNG inside the step too
        losses["aux"] = (gain.gain * batch["image"].mean() - noise) ** 2
        return losses

    data = DepthDataset(frames, 32, 32, augment=True)
    val_set = DepthDataset(frames[:2], 32, 32) if val else None
    trainer = Trainer(model, step, data, cfg, val_set=val_set, extra_modules={"gain": gain},
                      extra_optimizers={"aux": torch.optim.SGD(gain.parameters(), lr=0.1)})
    return trainer.fit(), gain


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    for key, value in sa["state_dict"].items():
        assert torch.equal(value, sb["state_dict"][key]), key


def test_deterministic_and_resume_is_exact(frames: list, tmp_path: Path) -> None:
    final_a, gain_a = run(make_cfg(tmp_path / "a"), frames)
    final_c, gain_c = run(make_cfg(tmp_path / "c"), frames)
    assert_same_weights(final_a, final_c)
    assert torch.equal(gain_a.gain, gain_c.gain) and gain_a.gain.item() != 1.0

    # an interrupted run: only the step-3 checkpoint survives (mid-epoch: 5 steps/epoch)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "ckpt_0000003.pt", tmp_path / "b")
    final_b, gain_b = run(make_cfg(tmp_path / "b", resume=True), frames, init_seed=123)
    assert_same_weights(final_a, final_b)
    assert torch.equal(gain_a.gain, gain_b.gain)
    last_a = torch.load(tmp_path / "a" / "ckpt_0000006.pt", weights_only=True)
    last_b = torch.load(tmp_path / "b" / "ckpt_0000006.pt", weights_only=True)
    assert last_a["optimizers"]["loss"]["state"][0]["exp_avg"].equal(
        last_b["optimizers"]["loss"]["state"][0]["exp_avg"])
    assert last_b["step"] == 6 and last_b["schedulers"]["loss"]["last_epoch"] == 6


def test_checkpoint_files_tensorboard_and_validation(frames: list, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, max_steps=4, ckpt_every=1, keep_checkpoints=2, eval_every=2)
    final, _ = run(cfg, frames, val=True)
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    model, model_cfg, extra = load_checkpoint(final)
    assert model_cfg == MODEL and extra["step"] == 4 and extra["config"]["max_steps"] == 4
    assert load_train_config(tmp_path / "config.yaml") == cfg
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/aux", "lr", "lr/aux", "val/abs_rel", "val/delta1"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    lrs = [e.value for e in events.Scalars("lr")]
    assert lrs[0] == pytest.approx(1e-3 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 4)).item()))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine reaches 0 at max_steps
    # a second run into the same folder must not silently mix checkpoints
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(cfg, frames)


def test_step_fn_errors(frames: list, tmp_path: Path) -> None:
    data = DepthDataset(frames[:4], 32, 32)
    model = build_model(MODEL)
    with pytest.raises(ValueError, match=r"missing loss\(es\) \['loss'\]"):
        Trainer(model, lambda m, b: {"other": m(b["image"]).mean()}, data, make_cfg(tmp_path)).fit()
    with pytest.raises(FloatingPointError, match="'loss' is not finite at step 1"):
        Trainer(model, lambda m, b: {"loss": m(b["image"]).mean() * float("nan")}, data,
                make_cfg(tmp_path / "nan")).fit()
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(model, supervised_step(build_loss("l1")), DepthDataset(frames[:1], 32, 32),
                make_cfg(tmp_path / "small"))


def test_frozen_parameters_stay_as_they_start_and_a_typo_is_refused(frames: list, tmp_path: Path) -> None:
    seed_everything(0)
    model = build_model(MODEL)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = make_cfg(tmp_path, max_steps=2, optim=OptimConfig(batch_size=2, lr=1e-2, frozen=("encoder.",)))
    final = Trainer(model, supervised_step(build_loss("silog")), DepthDataset(frames, 32, 32), cfg).fit()
    trained, _, _ = load_checkpoint(final)
    moved = {k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])}
    params = {name for name, _ in model.named_parameters()}
    assert moved & params and all(not k.startswith("encoder.") for k in moved & params)
    with pytest.raises(ValueError, match="no parameter of the model starts with 'encoderr.'"):
        Trainer(build_model(MODEL), supervised_step(build_loss("l1")), DepthDataset(frames, 32, 32),
                make_cfg(tmp_path / "typo", optim=OptimConfig(frozen=("encoderr.",))))
    deep = build_model(ModelConfig(name="fastdepth", **TINY_FASTDEPTH))
    trainable_parameters(deep, ("encoder.layers.1",))  # layer 1 only, by whole components
    still = {n for n, p in deep.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.layers.10.") for n in still)
    assert not any(n.startswith("encoder.layers.1.") for n in still)
    with pytest.raises(ValueError, match="leaves no parameter to train"):
        Trainer(build_model(MODEL), supervised_step(build_loss("l1")), DepthDataset(frames, 32, 32),
                make_cfg(tmp_path / "all", optim=OptimConfig(frozen=("",))))


def test_frame_size_must_suit_the_network_unless_it_resizes_its_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiples of 32 .* for model 'student'"):
        make_cfg(tmp_path, data=DataConfig(root="x", height=240, width=320))
    own_size = ModelConfig(name="fastdepth", input_size=(192, 192))
    cfg = make_cfg(tmp_path, data=DataConfig(root="x", height=240, width=320), model=own_size)
    assert cfg.model.resizes_input and not MODEL.resizes_input
    with pytest.raises(ValueError, match="input_size must be"):
        ModelConfig(name="fastdepth", input_size=(16, 192))


def test_repo_configs_parse() -> None:
    for path in sorted((REPO / "config" / "train").glob("*.yaml")):
        cfg = load_train_config(path, ["data.root=elsewhere"])
        assert cfg.data.root == "elsewhere" and cfg.max_steps >= 1, path
    assert {"tiny_student", "student_mbv2", "teacher_resnet50", "teacher_swin"} <= {
        p.stem for p in (REPO / "config" / "train").glob("*.yaml")}


def test_cli_simulate_train_evaluate_export(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, run_dir = tmp_path / "sim", tmp_path / "run"
    assert main(["simulate", "--style", "sim", "--n", "6", "--out", str(data), "--height", "96",
                 "--width", "128", "--workers", "1"]) == 0
    assert main(["train", "--config", str(REPO / "config/train/tiny_student.yaml"),
                 "--out", str(run_dir), f"data.root={data}", f"data.val_root={data}",
                 "max_steps=4", "ckpt_every=2", "eval_every=4", "optim.batch_size=2"]) == 0
    final = run_dir / "final.pt"
    assert final.is_file() and len(checkpoints(run_dir)) == 2
    # resuming a finished run trains nothing and leaves the weights alone
    before = torch.load(final, weights_only=True)["state_dict"]
    assert main(["train", "--config", str(run_dir / "config.yaml"), "--resume"]) == 0
    after = torch.load(final, weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)

    report = tmp_path / "eval.json"
    cfg = load_train_config(run_dir / "config.yaml")
    assert main(["evaluate", "--model", str(final), "--data", str(data), "--height",
                 str(cfg.data.height), "--width", str(cfg.data.width), "--latency-runs", "0",
                 "--json", str(report), "--no-progress"]) == 0
    row = json.loads(report.read_text())
    assert row["count"] == 6 and 0 < row["abs_rel"] < 10
    onnx_path = tmp_path / "tiny.onnx"
    assert main(["export", "--checkpoint", str(final), "--out", str(onnx_path), "--height",
                 str(cfg.data.height), "--width", str(cfg.data.width)]) == 0
    assert onnx_path.is_file() and "parity PASS" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    """DDP on CPU (gloo): both ranks train, only rank 0 writes."""
    data, run_dir = tmp_path / "sim", tmp_path / "run"
    assert main(["simulate", "--style", "sim", "--n", "8", "--out", str(data), "--height", "64",
                 "--width", "64", "--workers", "1"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "-m", "depthkd_core.cli", "train", "--config", str(REPO / "config/train/tiny_student.yaml"),
           "--out", str(run_dir), f"data.root={data}", "data.height=64", "data.width=64",
           "max_steps=4", "ckpt_every=2", "optim.batch_size=2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("final checkpoint") == 2
    assert [p.name for p in checkpoints(run_dir)] == ["ckpt_0000002.pt", "ckpt_0000004.pt"]
    assert len(list((run_dir / "tb").iterdir())) == 1
    assert len(torch.load(run_dir / "final.pt", weights_only=True)["state_dict"]) > 0
    extra = torch.load(run_dir / "ckpt_0000004.pt", weights_only=True)
    assert len(extra["rng"]) == 2  # each rank's RNG state, for an exact resume
