"""`depthkd bench-node`: what the live node costs on this machine.

Prints (and writes as JSON): model inference ms; node overhead per stage
(decode, preprocess, post-process, cloud, serialise) and its ratio to
inference; cloud build time against a plain memcpy of the same bytes;
end-to-end latency and drop rate with a real depth_node process fed at given
rates over DDS; the node's peak memory. A command, not a test: figures depend
on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from rclpy.serialization import serialize_message

from depthkd_core.data.readers import SimFolder
from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.inference import DepthEstimator, EstimatorConfig, build_point_cloud
from depthkd_ros.conversions import (depth_to_image, image_to_rgb, points_to_pointcloud2,
                                     rgb_to_image)
from depthkd_ros.tools.demo import PACKAGED_SEQUENCE
from depthkd_ros.depth_node import PACKAGED_MODEL
from depthkd_ros.tools.harness import Session, default_domain_id, latency_summary


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(PACKAGED_MODEL), help="ONNX model")
    parser.add_argument("--sequence", default=str(PACKAGED_SEQUENCE), help="frames to play")
    parser.add_argument("--width", type=int, default=640, help="camera width (frames resized)")
    parser.add_argument("--height", type=int, default=480, help="camera height")
    parser.add_argument("--rates", default="30,60", help="comma-separated input rates, Hz")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per rate")
    parser.add_argument("--repeats", type=int, default=30, help="runs per in-process timing")
    parser.add_argument("--cloud-decimation", type=int, default=1,
                        help="depth_node cloud_decimation (the cloud is 1/N^2 the size)")
    parser.add_argument("--json", default="bench_node.json", help="write the figures here")
    parser.add_argument("--domain-id", type=int, default=None)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def stage_timings(model_path: Path, rgb: np.ndarray, K, repeats: int,
                  decimation: int) -> dict[str, float]:
    """Per-stage cost of one frame inside the node, without DDS (median ms)."""
    estimator = DepthEstimator(OnnxDepthModel(model_path), EstimatorConfig())
    msg = rgb_to_image(rgb, "rgb8")
    runs = [estimator.estimate(rgb, K) for _ in range(repeats + 1)][1:]
    result = runs[-1]
    stage = {key: float(np.median([r.timings[key] for r in runs]))
             for key in ("preprocess", "inference", "postprocess")}
    stage["decode"] = median_ms(lambda: image_to_rgb(msg), repeats)
    cloud = build_point_cloud(result.depth, result.intrinsics, decimation, rgb)
    stage["cloud"] = median_ms(lambda: build_point_cloud(result.depth, result.intrinsics,
                                                         decimation, rgb), repeats)

    def serialise() -> None:
        serialize_message(points_to_pointcloud2(cloud[0], None, cloud[1]))
        serialize_message(depth_to_image(result.depth))

    stage["serialise"] = median_ms(serialise, repeats)
    cloud_bytes = cloud[0].size // 3 * 16  # x, y, z, rgb float32 per point
    src = np.empty(cloud_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    stage["memcpy_cloud_bytes"] = median_ms(lambda: np.copyto(dst, src), repeats)
    stage["cloud_mb"] = cloud_bytes / 1e6
    stage["network_size"] = list(estimator.network_size(rgb.shape[0], rgb.shape[1]))
    return stage


def stream(model_path: Path, frames: list[np.ndarray], K, rate: float, duration: float,
           domain_id: int, log: Path, decimation: int) -> dict[str, object]:
    """A real node process fed at ``rate`` Hz for ``duration`` s; depth + points subscribed."""
    params = {"model_path": str(model_path.resolve()), "publish_colored": False,
              "cloud_decimation": decimation}
    session = Session(params, domain_id, log, topics=("depth", "points"), keep_messages=False)
    try:
        stamps = session.play(frames, K, rate, duration_s=duration)
    finally:
        session.close()
    got = session.player.received.latency_ms
    diag = session.player.received.diagnostics
    sent = len(stamps)
    # The node's own counters separate its newest-frame-only drops from what the
    # subscriber (this process, sharing the CPU) failed to take in.
    node_received = float(diag.get("received_frames", "nan"))
    node_drop_rate = float(diag.get("dropped_frames", "nan")) / node_received
    return {"rate_hz": rate, "sent": sent, "depth_received": len(got["depth"]),
            "drop_rate": 1.0 - len(got["depth"]) / sent, "node_drop_rate": node_drop_rate,
            "output_hz": len(got["depth"]) / duration,
            "latency": latency_summary(got["depth"]),
            "node_peak_rss_mb": round(session.node.peak_rss_mb, 1),
            "diagnostics": diag}


def run_cli(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not model.is_file():
        raise FileNotFoundError(f"model not found: {model}")
    sequence = list(SimFolder(args.sequence))
    K = sequence[0].intrinsics.scaled(args.width, args.height)
    frames = [cv2.resize(f.rgb, (args.width, args.height), interpolation=cv2.INTER_LINEAR)
              for f in sequence]
    stage = stage_timings(model, frames[0], K, args.repeats, args.cloud_decimation)
    overhead = sum(stage[k] for k in ("decode", "preprocess", "postprocess", "cloud",
                                      "serialise"))
    report: dict[str, object] = {"model": str(model), "camera": [args.width, args.height],
                                 "cloud_decimation": args.cloud_decimation,
                                 "stages_ms": stage, "overhead_ms": overhead,
                                 "overhead_to_inference": overhead / stage["inference"]}
    print(f"depthkd bench-node: {model.name}, camera {args.width}x{args.height}, network "
          f"{stage['network_size'][1]}x{stage['network_size'][0]}, cloud decimation "
          f"{args.cloud_decimation}")
    print(f"  inference {stage['inference']:.2f} ms | overhead {overhead:.2f} ms "
          f"({overhead / stage['inference']:.2f}x inference): decode {stage['decode']:.2f}, "
          f"preprocess {stage['preprocess']:.2f}, postprocess {stage['postprocess']:.2f}, "
          f"cloud {stage['cloud']:.2f}, serialise {stage['serialise']:.2f}")
    print(f"  cloud build {stage['cloud']:.2f} ms vs memcpy of the same "
          f"{stage['cloud_mb']:.1f} MB {stage['memcpy_cloud_bytes']:.2f} ms "
          f"({stage['cloud'] / max(stage['memcpy_cloud_bytes'], 1e-6):.1f}x)")
    domain = args.domain_id if args.domain_id is not None else default_domain_id()
    streams = []
    for rate in (float(r) for r in args.rates.split(",") if r.strip()):
        s = stream(model, frames, K, rate, args.duration, domain,
                   Path(tempfile.gettempdir()) / f"depthkd_bench_node.{int(rate)}hz.log",
                   args.cloud_decimation)
        streams.append(s)
        lat = s["latency"]
        print(f"  {rate:.0f} Hz for {args.duration:.0f} s: {s['output_hz']:.1f} Hz received, drop "
              f"rate {s['drop_rate']:.1%} end to end ({s['node_drop_rate']:.1%} in the node), "
              f"latency mean {lat.get('mean_ms', 0):.1f} ms "
              f"p90 {lat.get('p90_ms', 0):.1f} ms, node peak RSS {s['node_peak_rss_mb']} MB")
        diag = s["diagnostics"]
        if diag:
            print(f"      node's own figures: inference {diag.get('inference_ms')} ms, decode to "
                  f"publish {diag.get('total_ms')} ms per frame")
    report["streams"] = streams
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"  wrote {args.json}")
    return 0
