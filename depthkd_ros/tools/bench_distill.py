"""`depthkd bench-distill`: the on-robot distillation loop measured end to end.

A real teacher server (KServe v2 over HTTP on 127.0.0.1), a real depth_node process
running a weak student, and a distill_node (in this process, on the harness's rclpy
context) that collects, labels, fine-tunes in its own process, gates and hot-swaps,
while a sequence is streamed over DDS for ``--minutes``. Reports keyframes/s stored,
teacher round-trip ms, fine-tuning steps/s (CPU, wall time of the round process
including its start-up) and the student-teacher AbsRel on the store's held-out
keyframes for the starting model and for the model live at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from depthkd_core.data.readers import SimFolder
from depthkd_ros.tools.demo import PACKAGED_SEQUENCE
from depthkd_ros.tools.harness import Session, default_domain_id, latency_summary

DEFAULT_TEACHER = Path(__file__).resolve().parents[3] / "shared" / "models" / "fastdepth" \
    / "fast_depth_224.onnx"


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER),
                        help="teacher (ONNX, TorchScript, checkpoint or HF folder)")
    parser.add_argument("--sequence", default=str(PACKAGED_SEQUENCE),
                        help="a `depthkd simulate` folder (rgb/, intrinsics.json)")
    parser.add_argument("--sim-style", default=None,
                        help="instead of --sequence: render a clip of this simulator style")
    parser.add_argument("--sim-frames", type=int, default=120, help="frames of --sim-style")
    parser.add_argument("--minutes", type=float, default=2.0, help="streaming time")
    parser.add_argument("--rate", type=float, default=5.0, help="camera rate, Hz")
    parser.add_argument("--novelty", type=float, default=0.03,
                        help="distill_node novelty_threshold (slow clips need less)")
    parser.add_argument("--min-interval", type=float, default=0.5,
                        help="distill_node min_interval_s")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"),
                        help="student size for fine-tuning and export (multiples of 32)")
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per round")
    parser.add_argument("--min-new", type=int, default=12, help="new keyframes per round")
    parser.add_argument("--margin", type=float, default=0.01, help="gate AbsRel margin")
    parser.add_argument("--out", default="bench_distill.json", help="JSON report")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID to use")


def weak_student(work: Path, size: tuple[int, int]) -> tuple[Path, Path]:
    """A random-init student (``live.pt`` beside ``live.onnx``, so the distill node finds the
    checkpoint of what the depth node runs): the model a new domain finds unprepared."""
    import torch

    from depthkd_core.export.onnx_export import export_onnx
    from depthkd_core.models import ModelConfig, build_model, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mobilenetv2_050", decoder_channels=(16, 16, 16, 16))
    model = build_model(cfg).eval()
    ckpt = save_checkpoint(work / "live.pt", model, cfg)
    if not export_onnx(model, work / "live.onnx", *size).passed:
        raise RuntimeError("the starting student failed ONNX parity")
    return ckpt, work / "live.onnx"


def _timed(fn: Callable[..., Any], log: list[tuple[float, Any]]) -> Callable[..., Any]:
    """``fn`` recording (seconds, result) per call: the node's own calls, measured."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        log.append((time.perf_counter() - start, result))
        return result
    return wrapper


def holdout_abs_rel(store_dir: Path, models: dict[str, Path]) -> dict[str, float | None]:
    """AbsRel vs the stored teacher depth on the store's held-out keyframes, per model."""
    from depthkd_core.runtime import OnnxDepthModel
    from depthkd_core.online.gate import evaluate_against_teacher
    from depthkd_core.online.keyframes import KeyframeStore

    store = KeyframeStore(store_dir / "keyframes", writer=False)
    keys = [k for k in store.holdout_keys() if store.teacher_depth(k) is not None]
    if not keys:
        return {name: None for name in models}
    return {name: evaluate_against_teacher(OnnxDepthModel(path, providers="cpu").predict,
                                           store, keys) for name, path in models.items()}


def _sequence(args: argparse.Namespace, work: Path) -> Path:
    if args.sim_style is None:
        return Path(args.sequence)
    from depthkd_core.data.simulator import write_dataset

    return write_dataset(work / "sim", args.sim_style, args.sim_frames, sequence=True, seed=7)


def _prepare(args: argparse.Namespace, work: Path) -> tuple[list[Any], Any, Path, Path]:
    """Frames, intrinsics, the weak student (checkpoint, ONNX) and the round's config."""
    if not Path(args.teacher).exists():
        raise FileNotFoundError(f"teacher not found: {args.teacher} (pass --teacher)")
    frames = list(SimFolder(_sequence(args, work)))
    if frames[0].intrinsics is None:
        raise ValueError("the sequence has no intrinsics.json")
    size = tuple(args.size)
    ckpt, live = weak_student(work, size)
    (work / "round.yaml").write_text(json.dumps({  # JSON is YAML
        "method": "labelfree", "steps_per_round": args.steps, "lr": 0.003, "batch_size": 4,
        "height": size[0], "width": size[1], "ckpt_every": 20,
        "method_kwargs": {"w_cwd": 1.0, "w_geo": 1.0, "w_mse": 1.0, "n_points": 256}}))
    return frames, frames[0].intrinsics, ckpt, live


def run_bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from rclpy.parameter import Parameter

    from depthkd_core.models.teachers import load_teacher
    from depthkd_core.serving.server import create_app
    from depthkd_core.serving.transport import BackgroundServer
    from depthkd_ros import distill_node as dn

    frames, K, _, live = _prepare(args, work)
    teacher = load_teacher(args.teacher, is_metric=True)
    domain = args.domain_id if args.domain_id is not None else default_domain_id()
    store_dir, rtt, rounds = work / "state", [], []
    params = {"store_dir": str(store_dir), "min_interval_s": args.min_interval,
              "novelty_threshold": args.novelty,
              "finetune_config": str(work / "round.yaml"), "min_new_keyframes": args.min_new,
              "gate_margin": args.margin, "export_height": args.size[0],
              "export_width": args.size[1]}
    with BackgroundServer(create_app(teacher, "teacher")) as url:
        session = Session({"model_path": str(live)}, domain, work / "depth_node.log",
                          topics=("depth",), keep_messages=False)
        node = None
        try:
            node = dn.DistillNode(context=session.context, parameter_overrides=[
                Parameter(k, value=v) for k, v in {**params, "teacher_url": url}.items()])
            node.client.infer = _timed(node.client.infer, rtt)
            node.supervisor.runner = _timed(node.supervisor.runner, rounds)  # where the node calls it
            session.executor.add_node(node)
            start = time.monotonic()
            sent = session.play([f.rgb for f in frames], K, args.rate, duration_s=args.minutes * 60)
            elapsed = time.monotonic() - start
        finally:
            if node is not None:
                session.executor.remove_node(node)
                node.destroy_node()
            session.close()
    status = node.status()  # after the threads stopped: counts and registry agree
    supervisor = node.supervisor
    final = None if supervisor.state.on_base else supervisor.registry.current()
    abs_rel = holdout_abs_rel(store_dir, {"before": live, "after": final or live})
    return {**_summary(args, status, len(sent), elapsed, rtt, rounds, abs_rel),
            "per_round": _per_round(store_dir, rounds)}


def _per_round(store_dir: Path, rounds: list[tuple[float, Any]]) -> list[dict[str, Any]]:
    """Each finished round: its gate (on the held-out keyframes of that time) and its
    candidate's AbsRel on the final held-out keyframes (one yardstick for every round)."""
    done = [r for _, r in rounds if r is not None]
    final = holdout_abs_rel(store_dir, {str(i): Path(r["onnx"]) for i, r in enumerate(done)
                                        if r.get("onnx")})
    return [{"round": i + 1, "seconds": round(s, 1), "steps": r["steps"],
             "gate_live": r["gate"]["live_abs_rel"], "gate_candidate": r["gate"]["candidate_abs_rel"],
             "deploy": r["gate"]["deploy"], "final_holdout": final.get(str(i))}
            for i, (s, r) in enumerate((s, r) for s, r in rounds if r is not None)]


def _summary(args: argparse.Namespace, status: dict[str, Any], sent: int, elapsed: float,
             rtt: list[tuple[float, Any]], rounds: list[tuple[float, Any]],
             abs_rel: dict[str, float | None]) -> dict[str, Any]:
    done = [(s, r) for s, r in rounds if r is not None]  # None: a round cut off at the end
    steps = sum(r["steps"] for _, r in done)
    return {
        "teacher": str(args.teacher), "frames_streamed": sent,
        "seconds": round(elapsed, 1), "keyframes": status["keyframes"],
        "keyframes_per_s": status["keyframes"] / elapsed, "labelled": status["labelled"],
        "teacher_failures": status["teacher_failures"],
        "teacher_rtt_ms": latency_summary([s * 1000.0 for s, _ in rtt]),
        "rounds": len(done), "finetune_steps": steps,
        "finetune_steps_per_s": steps / sum(s for s, _ in done) if done else None,
        "last_gate": status["last_gate"], "deploys": status["deploys"],
        "deployed_version": status["deployed_version"],
        "holdout_abs_rel_before": abs_rel["before"], "holdout_abs_rel_after": abs_rel["after"],
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_cli(args: argparse.Namespace) -> int:
    if args.minutes <= 0 or args.rate <= 0:
        raise ValueError("--minutes and --rate must be > 0")
    with tempfile.TemporaryDirectory(prefix="bench_distill_") as tmp:
        r = run_bench(args, Path(tmp))
    Path(args.out).write_text(json.dumps(r, indent=2))
    rtt = r["teacher_rtt_ms"]
    print(f"depthkd bench-distill: {r['seconds']} s, {r['frames_streamed']} frames streamed")
    print(f"  keyframes: {r['keyframes']} stored ({r['keyframes_per_s']:.2f}/s), "
          f"{r['labelled']} labelled, {r['teacher_failures']} teacher failures")
    print(f"  teacher round trip: mean {rtt.get('mean_ms', 0):.1f} ms, "
          f"p90 {rtt.get('p90_ms', 0):.1f} ms ({rtt['count']} calls)")
    sps = r["finetune_steps_per_s"]
    print(f"  fine-tuning: {r['rounds']} rounds, {r['finetune_steps']} steps, "
          f"{'n/a' if sps is None else f'{sps:.2f}'} steps/s (CPU, incl. process start)")
    print(f"  deploys: {r['deploys']} (live version {r['deployed_version']})")
    print(f"  student-teacher AbsRel on held-out keyframes: before {_fmt(r['holdout_abs_rel_before'])}"
          f", after {_fmt(r['holdout_abs_rel_after'])}")
    for row in r["per_round"]:
        print(f"  round {row['round']:2d}: {row['seconds']:5.1f} s, gate candidate "
              f"{_fmt(row['gate_candidate'])} vs live {_fmt(row['gate_live'])}"
              f"{' DEPLOYED' if row['deploy'] else ''}; on the final held-out keyframes "
              f"{_fmt(row['final_holdout'])}")
    print(f"  report: {args.out}")
    return 0
