"""`depthkd bench-node`: what the live node costs on this machine.

Prints (and writes as JSON): model inference ms; node overhead per stage
(decode, preprocess, post-process, cloud, serialise) and its ratio to
inference; cloud build time against a plain memcpy of the same bytes;
with a real depth_node process fed at given rates over DDS, the rates of depth
and points a subscriber in this (another) process receives, end-to-end latency,
drop rates, the node's own overhead per frame and its peak memory; and whether
the live-node targets hold (at the first rate: >= 29/30 of it received on both
outputs; overhead at most 1x inference). The node runs with its default
parameters and, as depth.launch.py starts it, the Fast DDS profile
config/fastdds.xml unless one is set (``--dds-profile``). A command, not a test:
figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from rclpy.serialization import serialize_message

from depthkd_core.data.readers import SimFolder
from depthkd_core.runtime import OnnxDepthModel
from depthkd_core.inference import CLOUD_RESOLUTIONS, DepthEstimator, EstimatorConfig
from depthkd_ros.conversions import depth_to_image, image_to_rgb, rgb_to_image
from depthkd_ros.dds import PROFILE_MODES, profile_environments, profile_in_use
from depthkd_ros.tools.demo import PACKAGED_SEQUENCE
from depthkd_ros.depth_node import PARAMS
from depthkd_ros.depth_pipeline import PACKAGED_MODEL, cloud_message
from depthkd_ros.tools.harness import Session, default_domain_id, latency_summary

NODE_DEFAULTS = {spec.name: spec.default for spec in PARAMS}
# The live-node targets: a subscriber gets this share of the input rate on every output,
# and the node spends at most this multiple of the inference time on everything else.
TARGET_RATE_SHARE = 29 / 30
TARGET_OVERHEAD_RATIO = 1.0


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(PACKAGED_MODEL), help="ONNX model")
    parser.add_argument("--sequence", default=str(PACKAGED_SEQUENCE), help="frames to play")
    parser.add_argument("--width", type=int, default=640, help="camera width (frames resized)")
    parser.add_argument("--height", type=int, default=480, help="camera height")
    parser.add_argument("--rates", default="30,60", help="comma-separated input rates, Hz")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per rate")
    parser.add_argument("--repeats", type=int, default=30, help="runs per in-process timing")
    parser.add_argument("--cloud-decimation", type=int, default=NODE_DEFAULTS["cloud_decimation"],
                        help="depth_node cloud_decimation (the cloud is 1/N^2 the size)")
    parser.add_argument("--cloud-resolution", choices=CLOUD_RESOLUTIONS,
                        default=NODE_DEFAULTS["cloud_resolution"],
                        help="depth_node cloud_resolution (camera: a VGA cloud is 4.9 MB)")
    parser.add_argument("--dds-profile", choices=PROFILE_MODES, default="both",
                        help="where config/fastdds.xml applies when no profile variable is "
                             "set: both processes (node, and camera + subscriber here), the "
                             "node only (as depth.launch.py with a driver started elsewhere), "
                             "or none (Fast DDS defaults)")
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


def stage_timings(model_path: Path, rgb: np.ndarray, K, repeats: int, decimation: int,
                  resolution: str) -> dict[str, float]:
    """Per-stage cost of one frame inside the node, without DDS (median ms)."""
    estimator = DepthEstimator(OnnxDepthModel(model_path), EstimatorConfig())
    msg = rgb_to_image(rgb, "rgb8")
    runs = [estimator.estimate(rgb, K) for _ in range(repeats + 1)][1:]
    result = runs[-1]
    stage = {key: float(np.median([r.timings[key] for r in runs]))
             for key in ("preprocess", "inference", "postprocess")}
    stage["decode"] = median_ms(lambda: image_to_rgb(msg), repeats)
    # cloud: points and their PointCloud2, as the node builds them; serialise: the depth
    # Image and both messages to CDR, as publish() does in C.
    stage["cloud"] = median_ms(lambda: cloud_message(result, rgb, resolution, decimation),
                               repeats)
    cloud = cloud_message(result, rgb, resolution, decimation)

    def serialise() -> None:
        serialize_message(cloud)
        serialize_message(depth_to_image(result.depth))

    stage["serialise"] = median_ms(serialise, repeats)
    src = np.empty(len(cloud.data), dtype=np.uint8)
    dst = np.empty_like(src)
    stage["memcpy_cloud_bytes"] = median_ms(lambda: np.copyto(dst, src), repeats)
    stage["cloud_mb"] = len(cloud.data) / 1e6
    stage["cloud_size"] = [cloud.height, cloud.width]
    stage["network_size"] = list(estimator.network_size(rgb.shape[0], rgb.shape[1]))
    return stage


def stream(model_path: Path, frames: list[np.ndarray], K, rate: float, duration: float,
           domain_id: int, log: Path, decimation: int, resolution: str,
           dds_profile: str) -> dict[str, object]:
    """A real node process fed at ``rate`` Hz for ``duration`` s; depth + points subscribed."""
    params = {"model_path": str(model_path.resolve()), "publish_colored": False,
              "cloud_decimation": decimation, "cloud_resolution": resolution}
    session = Session(params, domain_id, log, topics=("depth", "points"), keep_messages=False,
                      dds_profile=dds_profile)
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
    inference_ms, total_ms = (float(diag.get(k, "nan")) for k in ("inference_ms", "total_ms"))
    return {"rate_hz": rate, "sent": sent, "depth_received": len(got["depth"]),
            "points_received": len(got["points"]),
            "drop_rate": 1.0 - len(got["depth"]) / sent, "node_drop_rate": node_drop_rate,
            "output_hz": len(got["depth"]) / duration,
            "points_hz": len(got["points"]) / duration,
            # Diagnostics' total is decode to publish, waits for camera_info included.
            "node_overhead_to_inference": (total_ms - inference_ms) / inference_ms,
            # Everything the process spent (executor, DDS, worker) per frame it processed.
            "node_cpu_ms_per_frame": session.play_cpu_s * 1e3 / float(
                diag.get("processed_frames", "nan")),
            "latency": latency_summary(got["depth"]),
            "points_latency": latency_summary(got["points"]),
            "node_peak_rss_mb": round(session.node.peak_rss_mb, 1),
            "diagnostics": diag}


def run_stream(args: argparse.Namespace, model: Path, frames: list[np.ndarray], K,
               rate: float, domain: int) -> dict[str, object]:
    """One ``stream`` at ``rate``, printed."""
    s = stream(model, frames, K, rate, args.duration, domain,
               Path(tempfile.gettempdir()) / f"depthkd_bench_node.{int(rate)}hz.log",
               args.cloud_decimation, args.cloud_resolution, args.dds_profile)
    lat = s["latency"]
    print(f"  {rate:.0f} Hz for {args.duration:.0f} s: received in another process: depth "
          f"{s['output_hz']:.1f} Hz, points {s['points_hz']:.1f} Hz; drop rate "
          f"{s['drop_rate']:.1%} end to end ({s['node_drop_rate']:.1%} in the node), "
          f"latency mean {lat.get('mean_ms', 0):.1f} ms "
          f"p90 {lat.get('p90_ms', 0):.1f} ms, node peak RSS {s['node_peak_rss_mb']} MB")
    diag = s["diagnostics"]
    if diag:
        print(f"      node's own figures: inference {diag.get('inference_ms')} ms, decode to "
              f"publish {diag.get('total_ms')} ms per frame "
              f"(overhead {s['node_overhead_to_inference']:.2f}x inference); process CPU "
              f"{s['node_cpu_ms_per_frame']:.1f} ms per processed frame")
    return s


def run_cli(args: argparse.Namespace) -> int:
    model = Path(args.model)
    if not model.is_file():
        raise FileNotFoundError(f"model not found: {model}")
    sequence = list(SimFolder(args.sequence))
    K = sequence[0].intrinsics.scaled(args.width, args.height)
    frames = [cv2.resize(f.rgb, (args.width, args.height), interpolation=cv2.INTER_LINEAR)
              for f in sequence]
    stage = stage_timings(model, frames[0], K, args.repeats, args.cloud_decimation,
                          args.cloud_resolution)
    overhead = sum(stage[k] for k in ("decode", "preprocess", "postprocess", "cloud",
                                      "serialise"))
    ratio = overhead / stage["inference"]
    node_env, own_env = profile_environments(args.dds_profile)
    profiles = {"node": profile_in_use({**os.environ, **node_env}),
                "camera_and_subscriber": profile_in_use({**os.environ, **own_env})}
    report: dict[str, object] = {"model": str(model), "camera": [args.width, args.height],
                                 "cloud_decimation": args.cloud_decimation,
                                 "cloud_resolution": args.cloud_resolution,
                                 "dds_profile": {"mode": args.dds_profile, **profiles},
                                 "stages_ms": stage, "overhead_ms": overhead,
                                 "overhead_to_inference": ratio}
    print(f"depthkd bench-node: {model.name}, camera {args.width}x{args.height}, network "
          f"{stage['network_size'][1]}x{stage['network_size'][0]}, cloud "
          f"{args.cloud_resolution} resolution {stage['cloud_size'][1]}x{stage['cloud_size'][0]}"
          f" (decimation {args.cloud_decimation})")
    print(f"  DDS profile (--dds-profile {args.dds_profile}): node {profiles['node']}, camera "
          f"and subscriber {profiles['camera_and_subscriber']}")
    print(f"  inference {stage['inference']:.2f} ms | overhead {overhead:.2f} ms "
          f"({ratio:.2f}x inference): decode {stage['decode']:.2f}, "
          f"preprocess {stage['preprocess']:.2f}, postprocess {stage['postprocess']:.2f}, "
          f"cloud (points + message) {stage['cloud']:.2f}, serialise {stage['serialise']:.2f}")
    print(f"  cloud + message {stage['cloud']:.2f} ms vs memcpy of the same "
          f"{stage['cloud_mb']:.1f} MB {stage['memcpy_cloud_bytes']:.2f} ms "
          f"({stage['cloud'] / max(stage['memcpy_cloud_bytes'], 1e-6):.1f}x)")
    domain = args.domain_id if args.domain_id is not None else default_domain_id()
    streams = [run_stream(args, model, frames, K, float(rate), domain)
               for rate in args.rates.split(",") if rate.strip()]
    report["streams"] = streams
    if streams:
        first = streams[0]
        need = TARGET_RATE_SHARE * first["rate_hz"]
        targets = {"rate_hz": first["rate_hz"], "needed_hz": need,
                   "depth_ok": first["output_hz"] >= need, "points_ok": first["points_hz"] >= need,
                   "overhead_ok": ratio <= TARGET_OVERHEAD_RATIO}
        report["targets"] = targets
        verdict = {True: "met", False: "MISSED"}
        print(f"  targets at {first['rate_hz']:.0f} Hz: depth {first['output_hz']:.1f} Hz >= "
              f"{need:.1f} {verdict[targets['depth_ok']]}; points {first['points_hz']:.1f} Hz "
              f">= {need:.1f} {verdict[targets['points_ok']]}; overhead {ratio:.2f}x <= "
              f"{TARGET_OVERHEAD_RATIO:g}x inference {verdict[targets['overhead_ok']]}")
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"  wrote {args.json}")
    return 0
