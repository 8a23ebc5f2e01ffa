"""Measure the teacher server's memory under its largest allowed requests and under load.

    depthkd bench-teacher --teacher fast_depth_224.onnx [--load 4] [--server-args "--max-inflight 2 ..."]

Starts the real ``teacher_server`` program (its defaults, or the flags given after the
known ones), then for each phase resets the server's peak RSS (Linux
``/proc/<pid>/clear_refs``) and reports it: the largest binary request (one image of
--max-size, FP32 and UINT8), the largest JSON request and JSON reply, the request that
once took the server to 2.4 GB (now refused), and ``--load`` times ``--max-inflight``
concurrent largest requests (503 beyond the limit, not memory growth).

Exits 1 unless the bounds hold: every largest allowed request answered, the 2.4 GB one
refused with a 4xx, only 200s and 503s under load, and the peak under load within
idle + max_inflight x (the largest single request's peak above idle).
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from depthkd_core.serving.protocol import BINARY_CONTENT_TYPE, HEADER_LENGTH, encode_message
from depthkd_ros.teacher_server import build_parser, limits_of


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak since start or the last reset) of ``pid``, MB; Linux /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(images: np.ndarray, binary_reply: bool = True) -> tuple[bytes, dict[str, str]]:
    header = {"outputs": [{"name": "depth", "parameters": {"binary_data": binary_reply}}]}
    body, length = encode_message(header, "inputs", {"image": images}, binary=True)
    return body, {HEADER_LENGTH: str(length), "Content-Type": BINARY_CONTENT_TYPE}


def _largest_json_request(max_json_bytes: int, values: int) -> bytes:
    """A JSON request just under ``max_json_bytes`` (random FP32: long numbers) of at
    most ``values`` pixels a channel."""
    rng = np.random.default_rng(0)
    side = int(np.sqrt(values))
    while True:
        images = rng.random((1, 3, side, side), dtype=np.float32)
        body, _ = encode_message({}, "inputs", {"image": images}, binary=False)
        if len(body) <= max_json_bytes:
            return body
        side = int(side * 0.97)


def run(teacher: str, load: int = 4, server_args: list[str] | None = None) -> dict[str, Any]:
    """The phases' figures for a teacher_server started with ``server_args`` (its flags)."""
    port = _free_port()
    server_argv = ["--teacher", teacher, *(server_args or []), "--port", str(port), "--log-level", "warning"]
    args = build_parser().parse_args(server_argv)
    tensors, limits = limits_of(args)
    proc = subprocess.Popen([sys.executable, "-m", "depthkd_ros.teacher_server", *server_argv])
    import httpx

    url = f"http://127.0.0.1:{port}/v2/models/{args.model_name}/infer"
    report: dict[str, Any] = {"limits": {**vars(tensors), **vars(limits)}, "phases": {}}
    try:
        with httpx.Client(timeout=300) as http:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if http.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("bench_teacher: the server did not come up")
                time.sleep(0.2)
            http.post(url, content=_binary(np.full((1, 3, 64, 64), 0.5, np.float32))[0],
                      headers=_binary(np.zeros((1, 3, 8, 8), np.float32))[1])  # warm the teacher up
            report["idle_rss_mb"] = round(memory_mb(proc.pid)["VmRSS"], 1)
            side, rng = tensors.max_height, np.random.default_rng(1)
            quarter = int(np.sqrt(tensors.max_pixels / 4))
            json_side = int(np.sqrt(limits.max_json_reply_values))
            phases = {
                "binary FP32 1x3x{0}x{0}".format(side): lambda: _binary(
                    rng.random((1, 3, side, side), dtype=np.float32)),
                f"binary UINT8 4x3x{quarter}x{quarter}": lambda: _binary(
                    rng.integers(0, 256, (4, 3, quarter, quarter), dtype=np.uint8)),
                f"JSON reply 1x3x{json_side}x{json_side}": lambda: _binary(
                    rng.random((1, 3, json_side, json_side), dtype=np.float32), binary_reply=False),
                "largest JSON request": lambda: (_largest_json_request(
                    tensors.max_json_bytes, limits.max_json_reply_values), {}),
                "UINT8 8x3x1448x1448, JSON reply (2.4 GB before)": lambda: _binary(
                    np.zeros((8, 3, 1448, 1448), np.uint8), binary_reply=False),
            }
            for name, make in phases.items():
                body, headers = make()
                reset_peak(proc.pid)
                start = time.perf_counter()
                reply = http.post(url, content=body, headers=headers)
                seconds = time.perf_counter() - start
                memory = memory_mb(proc.pid)
                report["phases"][name] = {
                    "request_mb": round(len(body) / 2**20, 1), "status": reply.status_code,
                    "reply_mb": round(len(reply.content) / 2**20, 1), "seconds": round(seconds, 2),
                    "peak_rss_mb": round(memory["VmHWM"], 1), "rss_after_mb": round(memory["VmRSS"], 1),
                    **({"error": reply.json().get("error")} if reply.status_code != 200 else {})}
                del body, reply
        report["load"] = _load(url, proc.pid, load * limits.max_inflight, side)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return report


def _load(url: str, pid: int, count: int, side: int) -> dict[str, Any]:
    """``count`` clients at once, each sending the largest binary request once."""
    import httpx

    body, headers = _binary(np.random.default_rng(2).random((1, 3, side, side), dtype=np.float32))
    statuses: list[int] = []
    barrier = threading.Barrier(count)

    def client() -> None:
        with httpx.Client(timeout=300) as http:
            barrier.wait()
            statuses.append(http.post(url, content=body, headers=headers).status_code)

    reset_peak(pid)
    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    memory = memory_mb(pid)
    return {"clients": count, "ok": statuses.count(200), "busy_503": statuses.count(503),
            "other": sorted(s for s in statuses if s not in (200, 503)),
            "peak_rss_mb": round(memory["VmHWM"], 1), "rss_after_mb": round(memory["VmRSS"], 1)}


def verdict(report: dict[str, Any]) -> list[str]:
    """What breaks the bounds in ``report`` (empty: they hold)."""
    phases, load, idle = report["phases"], report["load"], report["idle_rss_mb"]
    problems = [f"{name}: {phase['status']}" for name, phase in phases.items()
                if (phase["status"] == 200) != ("2.4 GB" not in name) or phase["status"] >= 500]
    per_request = max(phase["peak_rss_mb"] for phase in phases.values()) - idle
    bound = idle + report["limits"]["max_inflight"] * per_request
    if load["other"]:
        problems.append(f"under load, statuses other than 200/503: {load['other']}")
    if load["peak_rss_mb"] > bound:
        problems.append(f"peak under load {load['peak_rss_mb']} MB over the bound {bound:.0f} MB")
    report["bound_mb"] = round(bound, 1)
    return problems


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="the teacher file teacher_server serves")
    parser.add_argument("--load", type=int, default=4, help="concurrent requests, times --max-inflight")
    parser.add_argument("--server-args", default="",
                        help="more teacher_server flags, one string (e.g. \"--max-inflight 2\")")


def run_cli(args: argparse.Namespace) -> int:
    report = run(args.teacher, args.load, shlex.split(args.server_args))
    problems = verdict(report)
    print(json.dumps(report, indent=2))
    for problem in problems:
        print(f"bench-teacher: bound broken: {problem}", file=sys.stderr)
    return 1 if problems else 0
