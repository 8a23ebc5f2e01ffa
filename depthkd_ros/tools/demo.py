"""`depthkd demo` (`make demo`): the live node on the bundled sequence, no camera needed.

Starts a real depth_node process with the packaged student, plays the bundled
rendered sequence on ``image`` + ``camera_info`` over real DDS, records
``depth``, ``depth/colored`` and ``points``, and writes what a person wants to
look at: a side-by-side PNG (RGB | predicted depth | ground truth | a rendered
view of the cloud), the cloud as PLY, and the measured rates, latencies and
accuracy (the sequence carries rendered ground-truth depth) as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from depthkd_core.data.readers import SimFolder
from depthkd_core.evaluate.metrics import MetricAccumulator
from depthkd_core.geometry import colorize_depth
from depthkd_core.geometry.pointcloud import render_point_cloud, write_ply
from depthkd_ros.conversions import depth_image_to_numpy, image_to_rgb, pointcloud2_to_numpy
from depthkd_ros.depth_pipeline import PACKAGED_MODEL
from depthkd_ros.tools.harness import Session, default_domain_id, latency_summary

PACKAGED_SEQUENCE = Path(__file__).resolve().parents[1] / "demo_data"
# ../shared beside the checkout (developers, CI); absent on an installed package.
SHARED = Path(__file__).resolve().parents[3] / "shared"
MIN_DEPTH, MAX_DEPTH = 0.1, 10.0


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--model", default=str(PACKAGED_MODEL), help="ONNX student")
    parser.add_argument("--sequence", default=str(PACKAGED_SEQUENCE),
                        help="a `depthkd simulate` folder (rgb/, depth/, intrinsics.json)")
    parser.add_argument("--rate", type=float, default=10.0, help="playback rate, Hz")
    parser.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID to use")


def _label(image: np.ndarray, text: str) -> np.ndarray:
    out = image.copy()
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    out[:h + 10, :w + 10] //= 3  # darken a box behind the caption so it reads on any colour
    cv2.putText(out, text, (5, h + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                cv2.LINE_AA)
    return out


def side_by_side(rgb: np.ndarray, depth: np.ndarray, gt: np.ndarray | None,
                 cloud: np.ndarray, cloud_rgb: np.ndarray | None) -> np.ndarray:
    """RGB | predicted depth | ground truth | cloud view, one row, uint8 RGB."""
    h, w = rgb.shape[:2]
    # One colour range for prediction and ground truth, so the panels compare.
    reference = gt[gt > 0] if gt is not None and np.any(gt > 0) else depth[np.isfinite(depth)]
    far = float(np.percentile(reference, 98))
    panels = [_label(rgb, "camera"), _label(colorize_depth(depth, MIN_DEPTH, far), "depth_node")]
    if gt is not None:
        panels.append(_label(colorize_depth(np.where(gt > 0, gt, np.nan), MIN_DEPTH, far),
                             "ground truth"))
    view = render_point_cloud(cloud, cloud_rgb, w, h)
    panels.append(_label(view, "points (oblique view)"))
    return np.concatenate(panels, axis=1)


def _collect(received: Any, frames: list, stamps: list[int]) -> tuple[dict, int | None]:
    """Accuracy of every received depth map against ground truth; pick a frame to show."""
    acc = MetricAccumulator()
    shown = None
    for i, stamp in enumerate(stamps):
        msg = received.messages["depth"].get(stamp)
        if msg is None:
            continue
        frame = frames[i % len(frames)]
        if frame.depth is not None:
            acc.update(depth_image_to_numpy(msg), frame.depth, min_depth=MIN_DEPTH,
                       max_depth=MAX_DEPTH)
        if all(stamp in received.messages[t] for t in ("points", "depth/colored")):
            if shown is None or abs(i - len(stamps) // 2) < abs(shown - len(stamps) // 2):
                shown = i
    return (acc.compute() if acc.count else {}), shown


def run_demo(out: Path, model: Path, sequence: Path, rate: float, domain_id: int) -> dict:
    if not model.is_file():
        raise FileNotFoundError(f"model not found: {model} (see README: `make demo-assets`)")
    frames = list(SimFolder(sequence))
    K = frames[0].intrinsics
    if K is None:
        raise ValueError(f"sequence {sequence} has no intrinsics.json")
    out.mkdir(parents=True, exist_ok=True)
    # The panel's oblique view and the PLY want a point per camera pixel (a 320x240 clip).
    params = {"model_path": str(model.resolve()), "publish_colored": True, "cloud_rgb": True,
              "cloud_resolution": "camera", "min_depth": MIN_DEPTH, "max_depth": MAX_DEPTH}
    session = Session(params, domain_id, out / "depth_node.log")
    try:
        stamps = session.play([f.rgb for f in frames], K, rate)
    finally:
        session.close()
    received = session.player.received
    accuracy, shown = _collect(received, frames, stamps)
    if shown is None:
        raise RuntimeError(f"no complete output received from depth_node; log: "
                           f"{out / 'depth_node.log'}")
    stamp = stamps[shown]
    depth = depth_image_to_numpy(received.messages["depth"][stamp])
    points, colors = pointcloud2_to_numpy(received.messages["points"][stamp])
    n_points = write_ply(out / "points.ply", points, colors)
    panel = side_by_side(frames[shown].rgb, depth, frames[shown].depth, points, colors)
    cv2.imwrite(str(out / "demo.png"), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(out / "depth_colored.png"),
                cv2.cvtColor(image_to_rgb(received.messages["depth/colored"][stamp]),
                             cv2.COLOR_RGB2BGR))
    summary = {
        "model": str(model), "frames_sent": len(stamps), "playback_hz": rate,
        "frames_received": {t: len(m) for t, m in received.messages.items()},
        "latency": {t: latency_summary(v) for t, v in received.latency_ms.items()},
        "node_diagnostics": received.diagnostics,
        "node_peak_rss_mb": round(session.node.peak_rss_mb, 1),
        "accuracy_vs_ground_truth": accuracy, "shown_frame": shown, "ply_points": n_points,
        "outputs": ["demo.png", "depth_colored.png", "points.ply", "summary.json"],
    }
    summary["real_frames"] = real_frame_accuracy(model)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def real_frame_accuracy(model: Path) -> dict[str, dict[str, float]]:
    """The model on the real RGB-D frames of ../shared (beside the checkout), against their
    ground truth and, when FastDepth is there too, against it; {} without ../shared."""
    from depthkd_core.bench.real import RealBenchConfig, judge_on_real_sets

    teacher = SHARED / "models" / "fastdepth" / "fast_depth_224.onnx"
    return judge_on_real_sets(model, teacher if teacher.is_file() else None,
                              RealBenchConfig.default_sets(SHARED))


def run_cli(args: argparse.Namespace) -> int:
    out = Path(args.out)
    domain = args.domain_id if args.domain_id is not None else default_domain_id()
    s = run_demo(out, Path(args.model), Path(args.sequence), args.rate, domain)
    lat = s["latency"]["depth"]
    diag = s["node_diagnostics"]
    acc = s["accuracy_vs_ground_truth"]
    print(f"depthkd demo: {s['frames_sent']} frames played at {s['playback_hz']:.0f} Hz, "
          f"{s['frames_received']['depth']} depth maps and {s['frames_received']['points']} "
          f"clouds received")
    print(f"  end-to-end latency (stamp -> depth received): mean {lat.get('mean_ms', 0):.1f} ms, "
          f"p90 {lat.get('p90_ms', 0):.1f} ms")
    if diag:
        print(f"  node: inference {diag.get('inference_ms', '?')} ms, total "
              f"{diag.get('total_ms', '?')} ms per frame on {diag.get('provider', '?')}, "
              f"dropped {diag.get('dropped_frames', '?')}, peak RSS {s['node_peak_rss_mb']} MB")
    if acc:
        print(f"  accuracy vs rendered ground truth: AbsRel {acc['abs_rel']:.3f}, "
              f"RMSE {acc['rmse']:.3f} m, delta1 {acc['delta1']:.3f}")
    for name, real in s["real_frames"].items():
        agree = (f"; agreement with FastDepth delta1 {real['agree_delta1']:.3f}"
                 if "agree_delta1" in real else "")
        print(f"  real frames ({name}, {real['frames']}): AbsRel {real['gt_abs_rel']:.3f}, "
              f"delta1 {real['gt_delta1']:.3f} (median-aligned {real['gt_med_delta1']:.3f}){agree}")
    print(f"  wrote {out / 'demo.png'}, {out / 'points.ply'} ({s['ply_points']} points), "
          f"{out / 'summary.json'}")
    return 0
