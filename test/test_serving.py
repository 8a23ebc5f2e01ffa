"""Teacher server and client: KServe v2 tensors, real HTTP on 127.0.0.1, the real
FastDepth ONNX teacher, limits, auth, batching, retries and the circuit breaker."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import socket
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from depthkd_core.serving.client import (CircuitBreaker, TeacherBusy, TeacherClient,
                                         TeacherRequestError, TeacherUnavailable)
from depthkd_core.serving.protocol import (HEADER_LENGTH, PayloadTooLarge, TensorLimits,
                                           decode_message, encode_message)
from depthkd_core.serving.batcher import Batcher
from depthkd_core.serving.server import ServerLimits, create_app
from depthkd_core.serving.transport import BackgroundServer
from depthkd_ros import teacher_server

REPO = Path(__file__).resolve().parents[1]
from helpers import FASTDEPTH, TUM as TUM_DIR, require_shared, wait_until

TUM = TUM_DIR / "tum_color.png"
TOKEN = "s3cret-token"
LIMITS = TensorLimits(max_batch=4, max_height=512, max_width=512, max_body_bytes=2 << 20)


def _bits(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint32) if array.dtype == np.float32 else array


@pytest.mark.parametrize("binary", [False, True])
def test_protocol_round_trip_is_bit_exact(binary: bool) -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    image.flat[:4] = [-0.0, 1e-45, 3.4028235e38, 1 / 3]  # sign of zero, subnormal, max, inexact
    mask = rng.integers(0, 256, (1, 1, 4, 4), dtype=np.uint8)
    body, length = encode_message({"id": "a"}, "inputs", {"image": image, "mask": mask}, binary)
    header, tensors = decode_message(body, length, "inputs", TensorLimits(min_size=4))
    assert header["id"] == "a" and list(tensors) == ["image", "mask"]
    for name, sent in (("image", image), ("mask", mask)):
        assert tensors[name].dtype == sent.dtype and tensors[name].shape == sent.shape
        assert np.array_equal(_bits(tensors[name]), _bits(sent))
    if binary:  # layout: JSON header, then the raw little-endian bytes in header order
        specs = json.loads(body[:length])["inputs"]
        assert [s["parameters"]["binary_data_size"] for s in specs] == [2 * 3 * 5 * 7 * 4, 16]
        assert body[length:] == image.astype("<f4").tobytes() + mask.tobytes()
    else:
        assert length is None


def _binary(shape: list[int], datatype: str = "FP32", size: int | None = None,
            payload: bytes | None = None) -> tuple[bytes, int]:
    count = int(np.prod(shape)) * (4 if datatype == "FP32" else 1)
    header = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": count if size is None else size}}]})
    return header.encode() + (bytes(count) if payload is None else payload), len(header)


def _json_body(shape: Any, data: Any, datatype: str = "FP32") -> tuple[bytes, None]:
    return json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": datatype,
                                   "data": data}]}).encode(), None


MALFORMED = {
    "FP64": (_binary([1, 3, 8, 8], "FP64"), "datatype 'FP64' not allowed"),
    "rank 3": (_binary([3, 8, 8]), "rank 3"),
    "batch": (_binary([5, 3, 8, 8]), "batch 5 outside 1..4"),
    "height": (_binary([1, 3, 4, 8]), "height 4 outside"),
    "width": (_binary([1, 3, 8, 600]), "width 600 outside"),
    "size mismatch": (_binary([1, 3, 8, 8], size=100), "needs 768 bytes"),
    "truncated": (_binary([1, 3, 8, 8], payload=bytes(700)), "ends 68 bytes early"),
    "extra bytes": (_binary([1, 3, 8, 8], payload=bytes(800)), "32 unclaimed bytes"),
    "float shape": (_binary([1.0, 3, 8, 8]), "shape must be a list"),
    "json count": (_json_body([1, 3, 8, 8], [0.5] * 10), "10 values for shape"),
    "json text": (_json_body([1, 3, 8, 8], ["a"] * 192), "not a list of FP32"),
    "uint8 range": (_json_body([1, 3, 8, 8], [300] * 192, "UINT8"), "not a list of UINT8"),
    "not json": ((b"{nope", None), "not valid JSON"),
    "no inputs": ((b'{"inputs": []}', None), "non-empty 'inputs'"),
    "header length": ((b'{"inputs": []}', 999), "outside 1..14"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_protocol_refuses_malformed_tensors(case: str) -> None:
    (body, length), reason = MALFORMED[case]
    with pytest.raises(ValueError, match=reason):
        decode_message(body, length, "inputs", LIMITS)
    with pytest.raises(PayloadTooLarge):
        decode_message(bytes(LIMITS.max_body_bytes + 1), None, "inputs", LIMITS)


@pytest.fixture(scope="module")
def served() -> Any:
    """The real FastDepth ONNX teacher behind the server, on 127.0.0.1:<ephemeral>."""
    require_shared()
    from depthkd_core.models.teachers import load_teacher

    teacher = load_teacher(FASTDEPTH)
    app = create_app(teacher, "fastdepth", token=TOKEN, limits=LIMITS, max_batch=4, max_wait_ms=150)
    with BackgroundServer(app) as url:
        yield types.SimpleNamespace(url=url, teacher=teacher, batcher=app.state.batcher,
                                    auth={"Authorization": f"Bearer {TOKEN}"})


def _direct(teacher: Any, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return teacher(torch.from_numpy(images)).numpy()


def _tum_images() -> np.ndarray:
    import cv2

    require_shared()
    rgb = cv2.cvtColor(cv2.imread(str(TUM)), cv2.COLOR_BGR2RGB)
    rgb = cv2.resize(rgb, (160, 120), interpolation=cv2.INTER_AREA)
    image = rgb.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    return np.concatenate([image, image[:, :, ::-1, ::-1]])  # two different frames


def test_client_output_equals_the_teacher(served: Any) -> None:
    images = _tum_images()
    with TeacherClient(served.url, "fastdepth", token=TOKEN, retries=0) as client:
        depth = client.infer(images)
        meta = client.metadata()
        assert client.ready() and client.last_latency_ms > 0
    expected = _direct(served.teacher, images)
    assert depth.shape == (2, 1, 120, 160) and np.array_equal(depth, expected)
    assert 0.3 < float(np.median(depth)) < 10.0  # metres, an indoor scene
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    assert meta["outputs"] == [{"name": "depth", "datatype": "FP32", "shape": [-1, 1, -1, -1]}]
    assert meta["parameters"]["is_metric"] is True and meta["parameters"]["is_inverse"] is False


def test_json_form_and_uint8_input(served: Any) -> None:
    images = _tum_images()[:1]
    raw = np.round(images * 255).astype(np.uint8)
    body, _ = encode_message({"id": "j1"}, "inputs", {"image": raw}, binary=False)
    reply = httpx.post(f"{served.url}/v2/models/fastdepth/infer", content=body, headers=served.auth)
    assert reply.status_code == 200 and HEADER_LENGTH not in reply.headers
    header, outputs = decode_message(reply.content, None, "outputs")
    assert header["id"] == "j1" and header["model_name"] == "fastdepth"
    assert np.array_equal(outputs["depth"], _direct(served.teacher, raw.astype(np.float32) / 255.0))


def test_health_metadata_and_token(served: Any) -> None:
    url = served.url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200  # probes need no token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for reply in (httpx.get(f"{url}/v2/models/fastdepth", headers=headers),
                      httpx.post(f"{url}/v2/models/fastdepth/infer", content=b"{}", headers=headers)):
            assert reply.status_code == 401 and "token" in reply.json()["error"]
    assert httpx.get(f"{url}/v2/models/other", headers=served.auth).status_code == 404
    assert httpx.get(f"{url}/docs", headers=served.auth).status_code == 404
    with TeacherClient(url, "fastdepth", token="wrong", retries=3, sleep=pytest.fail) as client:
        with pytest.raises(TeacherRequestError, match="401"):  # a 4xx is never retried
            client.infer(np.zeros((1, 3, 16, 16), np.float32))
    assert client.breaker.consecutive == 0


def test_oversized_and_malformed_requests_are_refused(served: Any) -> None:
    infer = f"{served.url}/v2/models/fastdepth/infer"
    big = bytes(LIMITS.max_body_bytes + 1)
    reply = httpx.post(infer, content=big, headers=served.auth)
    assert reply.status_code == 413 and "exceeds" in reply.json()["error"]
    chunked = httpx.post(infer, content=iter([big[:1 << 20]] * 3), headers=served.auth)  # no length
    assert chunked.status_code == 413
    cases = dict(MALFORMED)
    nan = np.full((1, 3, 8, 8), np.nan, np.float32)
    cases["NaN"] = (encode_message({}, "inputs", {"image": nan}, True), "NaN")
    cases["channels"] = (_binary([1, 1, 8, 8]), r"\(B,3,H,W\)")
    for name, ((body, length), reason) in cases.items():
        headers = {**served.auth, **({HEADER_LENGTH: str(length)} if length else {})}
        reply = httpx.post(infer, content=body, headers=headers)
        assert reply.status_code == 400, (name, reply.text)
        assert reply.json()["error"], name
        assert re.search(reason, reply.json()["error"]), (name, reply.json())
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200
    with TeacherClient(served.url, "fastdepth", token=TOKEN, retries=0) as client:
        assert client.infer(np.full((1, 3, 32, 32), 0.5, np.float32)).shape == (1, 1, 32, 32)


def test_concurrent_requests_are_batched(served: Any) -> None:
    rng = np.random.default_rng(1)
    images = rng.random((4, 1, 3, 64, 64), dtype=np.float32)
    results: list[np.ndarray | None] = [None] * 4
    barrier = threading.Barrier(4, timeout=10)

    def ask(i: int) -> None:
        with TeacherClient(served.url, "fastdepth", token=TOKEN, retries=0) as client:
            client.ready()  # connect first, so the four requests arrive together
            barrier.wait()
            results[i] = client.infer(images[i])

    calls = served.batcher.calls
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert served.batcher.calls - calls < 4
    for i in range(4):
        assert np.allclose(results[i], _direct(served.teacher, images[i]), atol=1e-5)


def _fake_teacher_app(statuses: list[int], garbage: bool = False,
                      headers: dict[str, str] | None = None) -> tuple[FastAPI, list[int]]:
    """Answers with ``statuses`` (and ``headers``) in turn (then 200: depth = mean image colour)."""
    app, seen = FastAPI(), []

    @app.post("/v2/models/fake/infer")
    async def infer(request: Request) -> Response:
        seen.append(1)
        if len(seen) <= len(statuses):
            return JSONResponse({"error": "boom"}, status_code=statuses[len(seen) - 1], headers=headers)
        if garbage:
            return Response(b"\x00garbage", headers={HEADER_LENGTH: "3"})
        _, tensors = decode_message(await request.body(), request.headers[HEADER_LENGTH], "inputs")
        depth = tensors["image"].mean(axis=1, keepdims=True)
        body, length = encode_message({}, "outputs", {"depth": depth}, True)
        return Response(body, headers={HEADER_LENGTH: str(length)})

    return app, seen


def test_client_retries_with_exponential_backoff() -> None:
    app, seen = _fake_teacher_app([500, 503])
    sleeps: list[float] = []
    images = np.random.default_rng(2).random((1, 3, 8, 8), dtype=np.float32)
    with BackgroundServer(app) as url, TeacherClient(url, "fake", retries=3, backoff_s=0.01,
                                                     sleep=sleeps.append) as client:
        depth = client.infer(images)
    assert len(seen) == 3 and sleeps == [0.01, 0.02]
    assert np.array_equal(depth, images.mean(axis=1, keepdims=True))


def test_client_gives_up_on_garbage_and_never_retries_4xx() -> None:
    images = np.zeros((1, 3, 8, 8), np.float32)
    app, seen = _fake_teacher_app([], garbage=True)
    with BackgroundServer(app) as url, TeacherClient(url, "fake", retries=2, sleep=lambda s: None) as client:
        with pytest.raises(TeacherUnavailable, match="failed 3 attempts"):
            client.infer(images)
    assert len(seen) == 3
    app, seen = _fake_teacher_app([413])
    with BackgroundServer(app) as url, TeacherClient(url, "fake", retries=2, sleep=pytest.fail) as client:
        with pytest.raises(TeacherRequestError, match="413.*boom"):
            client.infer(images)
    assert len(seen) == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_circuit_breaker_opens_and_fails_fast() -> None:
    client = TeacherClient(f"http://127.0.0.1:{_closed_port()}", "fake", timeout_s=2, retries=0,
                           breaker_failures=3, breaker_cooldown_s=60)
    images = np.zeros((1, 3, 8, 8), np.float32)
    for _ in range(3):
        with pytest.raises(TeacherUnavailable, match="ConnectError"):
            client.infer(images)
    client._http.post = pytest.fail  # an open breaker must not even try the network
    start = time.perf_counter()
    with pytest.raises(TeacherUnavailable, match="circuit open"):
        client.infer(images)
    assert time.perf_counter() - start < 0.05
    client.close()
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown_s=10, clock=lambda: now[0])
    breaker.failure()
    assert not breaker.is_open
    breaker.failure()
    now[0] = 9.9
    assert breaker.is_open
    now[0] = 10.0  # half-open: one trial; a failure re-opens, a success closes
    assert not breaker.is_open
    breaker.failure()
    assert breaker.is_open
    breaker.success()
    assert not breaker.is_open and breaker.consecutive == 0


def test_server_program_accepts_the_ros_arguments_launch_appends(tmp_path: Path) -> None:
    """launch_ros appends ``--ros-args -r __node:=NAME``; argparse used to exit 2 on it."""
    strip = teacher_server.strip_ros_args
    assert strip(["--teacher", "t", "--ros-args", "-r", "__node:=teacher_server"]) == ["--teacher", "t"]
    assert strip(["--ros-args", "-p", "a:=1", "--", "--port", "9", "--ros-args", "--log-level",
                  "debug"]) == ["--port", "9"]
    with pytest.raises(SystemExit, match="refusing to bind"):  # parsed past the ROS arguments
        teacher_server.main(["--teacher", "t", "--host", "0.0.0.0", "--ros-args", "-r",
                             "__node:=teacher_server"])


def test_server_program_is_secure_by_default(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit, match="refusing to bind 0.0.0.0 without a bearer token"):
        teacher_server.main(["--teacher", str(FASTDEPTH), "--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="go together"):
        teacher_server.main(["--teacher", str(FASTDEPTH), "--ssl-certfile", str(FASTDEPTH)])
    with pytest.raises(SystemExit, match="token file not found"):
        teacher_server.main(["--teacher", "x", "--host", "0.0.0.0", "--token-file", str(tmp_path / "no")])
    assert teacher_server.build_parser().parse_args(["--teacher", "t"]).host == "127.0.0.1"
    for host in ("127.0.0.1", "127.8.0.1", "::1", "localhost"):
        teacher_server.check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.20", "robot.local"):
        with pytest.raises(ValueError):
            teacher_server.check_bind(host, None)
        teacher_server.check_bind(host, "token")
    (tmp_path / "token").write_text("abc\n")
    argv = ["--teacher", "t", "--token-file", str(tmp_path / "token")]
    args = teacher_server.build_parser().parse_args(argv)
    assert teacher_server.read_token(args) == "abc"


def test_server_program_takes_every_bound_as_a_flag() -> None:
    parse = teacher_server.build_parser().parse_args
    tensors, server = teacher_server.limits_of(parse(["--teacher", "t"]))
    assert (tensors, server) == (TensorLimits(), ServerLimits())  # documented defaults, one source
    argv = ["--teacher", "t", "--max-body-mb", "2", "--max-json-mb", "0.5", "--max-size", "640",
            "--max-pixels", "1000", "--max-inflight", "3", "--retry-after-s", "7",
            "--max-json-reply-values", "99", "--body-timeout-s", "4", "--header-timeout-s", "5",
            "--reply-timeout-s", "3", "--keep-alive-s", "6", "--max-connections", "9", "--max-header-kb", "8"]
    tensors, server = teacher_server.limits_of(parse(argv))
    assert (tensors.max_body_bytes, tensors.max_json_bytes, tensors.max_height, tensors.max_pixels) == (
        2 << 20, 1 << 19, 640, 1000)
    assert server == ServerLimits(max_inflight=3, retry_after_s=7, max_json_reply_values=99,
                                  body_timeout_s=4, header_timeout_s=5, reply_timeout_s=3, keep_alive_s=6,
                                  max_connections=9, max_header_bytes=8192)
    for flag, value in (("--max-inflight", "0"), ("--max-pixels", "0"), ("--header-timeout-s", "0"),
                        ("--max-size", "4"), ("--max-connections", "-1")):
        with pytest.raises(SystemExit, match="must be"):
            teacher_server.main(["--teacher", "t", flag, value])


@pytest.mark.needs_shared
def test_server_program_serves(tmp_path: Path) -> None:
    """The console-script entry point really serves, on loopback, with a token, and stops
    quietly on Ctrl-C as ros2 launch delivers it: twice (uvicorn took the second one as
    "force exit" and cancelled its own shutdown, with a traceback)."""
    (tmp_path / "token").write_text(TOKEN)
    port = _closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "depthkd_ros.teacher_server",
                             "--teacher", str(FASTDEPTH), "--model-name", "fd", "--port", str(port),
                             "--token-file", str(tmp_path / "token"), "--log-level", "warning"], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        client = TeacherClient(f"http://127.0.0.1:{port}", "fd", token=TOKEN, retries=0)
        # a server that died fails at once instead of at the timeout
        wait_until(lambda: client.ready() or proc.poll() is not None, timeout=45, interval=0.2,
                   what="the server to come up")
        assert proc.poll() is None, "the server exited"
        assert client.infer(np.full((1, 3, 32, 32), 0.5, np.float32)).shape == (1, 1, 32, 32)
        client.close()
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


class _Recorder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def test_launch_file_builds_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    modules = {name: types.ModuleType(name) for name in ("launch", "launch.actions", "launch.substitutions",
                                                         "launch_ros", "launch_ros.actions")}
    modules["launch"].LaunchDescription = _Recorder
    modules["launch.actions"].DeclareLaunchArgument = type("DeclareLaunchArgument", (_Recorder,), {})
    modules["launch.actions"].OpaqueFunction = type("OpaqueFunction", (_Recorder,), {})
    modules["launch.substitutions"].LaunchConfiguration = lambda name: types.SimpleNamespace(
        perform=lambda context: context.launch_configurations[name])
    modules["launch_ros.actions"].Node = type("Node", (_Recorder,), {})
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    path = REPO / "launch" / "teacher_server.launch.py"
    spec = importlib.util.spec_from_file_location("teacher_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entities = module.generate_launch_description().args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities
                if type(e).__name__ == "DeclareLaunchArgument"}
    assert declared["host"] == "127.0.0.1"
    (opaque,) = [e for e in entities if type(e).__name__ == "OpaqueFunction"]
    context = types.SimpleNamespace(launch_configurations={**declared, "teacher": "/m/t.onnx",
                                                           "token_file": "/k/tok"})
    (node,) = opaque.kwargs["function"](context)
    assert node.kwargs["executable"] == "teacher_server" and node.kwargs["package"] == "depthkd_ros"
    argv = node.kwargs["arguments"]
    parsed = teacher_server.build_parser().parse_args(argv)  # the program accepts what launch passes
    assert (parsed.teacher, parsed.token_file) == ("/m/t.onnx", "/k/tok")
    assert (parsed.host, parsed.port, parsed.max_batch) == ("127.0.0.1", 8000, 8)
    assert "--ssl-keyfile" not in argv and "--max-inflight" not in argv  # empty: the program's default
    context.launch_configurations.update(max_inflight="2", header_timeout_s="3")
    (node,) = opaque.kwargs["function"](context)
    bounds = teacher_server.limits_of(teacher_server.build_parser().parse_args(node.kwargs["arguments"]))[1]
    assert (bounds.max_inflight, bounds.header_timeout_s) == (2, 3.0)
    with pytest.raises(ValueError, match="teacher:="):
        opaque.kwargs["function"](types.SimpleNamespace(launch_configurations=declared))


class _FailingTeacher:
    """Refuses 8x8 images (ValueError), crashes on 16x16 (RuntimeError), else depth = 2."""

    name, is_metric, is_inverse = "failing", True, False

    def __call__(self, images: Any) -> Any:
        if images.shape[-1] == 8:
            raise ValueError("images too small for this teacher")
        if images.shape[-1] == 16:
            raise RuntimeError("out of GPU memory")
        return images[:, :1] * 0 + 2


def test_teacher_failures_are_4xx_or_500_and_the_server_survives(caplog: Any) -> None:
    app = create_app(_FailingTeacher(), "f", max_wait_ms=0)
    with BackgroundServer(app) as url:
        with TeacherClient(url, "f", retries=0, breaker_failures=10) as client:
            with pytest.raises(TeacherRequestError, match="400.*too small"):
                client.infer(np.zeros((1, 3, 8, 8), np.float32))
            with pytest.raises(TeacherUnavailable, match="500: internal server error"):
                client.infer(np.zeros((1, 3, 16, 16), np.float32))
            assert np.array_equal(client.infer(np.zeros((2, 3, 24, 24), np.float32)),
                                  np.full((2, 1, 24, 24), 2, np.float32))
    assert "out of GPU memory" in caplog.text  # the reason stays in the server's log


def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl cannot make a certificate: {exc}")
    app = create_app(_FailingTeacher(), "f", token=TOKEN, max_wait_ms=0)
    with BackgroundServer(app, ssl_keyfile=str(key), ssl_certfile=str(cert)) as url:
        assert url.startswith("https://")
        with TeacherClient(url, "f", token=TOKEN, retries=0, verify=str(cert)) as client:
            assert client.infer(np.zeros((1, 3, 24, 24), np.float32)).shape == (1, 1, 24, 24)
        with TeacherClient(url, "f", token=TOKEN, retries=0) as untrusting:  # system CAs only
            with pytest.raises(TeacherUnavailable, match="(?i)certificate"):
                untrusting.infer(np.zeros((1, 3, 24, 24), np.float32))


# -- hostile requests, bounds, slow clients --------------------------------------------


class _CountingTeacher:
    """depth = 2 everywhere; ``calls`` counts teacher runs; with ``gate`` each call first
    reports itself (``entered``) and waits for ``gate`` to open."""

    name, is_metric, is_inverse = "counting", True, False

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls, self.gate, self.entered = 0, gate, threading.Event()

    def __call__(self, images: Any) -> Any:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        return images[:, :1] * 0 + 2


HOSTILE_LIMITS = TensorLimits(max_batch=4, max_height=512, max_width=512, max_pixels=4 * 64 * 64,
                              max_body_bytes=1 << 20, max_json_bytes=256 << 10)
HOSTILE_SERVER = ServerLimits(max_json_reply_values=2 * 16 * 16)
GOOD = {"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.5] * 192}


def _request(**fields: Any) -> bytes:
    return json.dumps({"inputs": [GOOD], **fields}).encode()


def _tensor(**fields: Any) -> bytes:
    return json.dumps({"inputs": [{**GOOD, **fields}]}).encode()


def _bin(spec: dict[str, Any], payload: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "image", **spec}]}).encode()
    return header + payload, {HEADER_LENGTH: str(len(header))}


NAN = np.full((1, 3, 8, 8), 0.5, np.float32)
NAN[0, 1, 2, 3] = np.nan
INF = np.full((1, 3, 8, 8), np.inf, np.float32)
DEEP = b"[" * 100_000 + b"]" * 100_000
FP32_8 = {"shape": [1, 3, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 768}}

# name -> (body, extra headers, status, reason regex)
HOSTILE: dict[str, tuple[bytes, dict[str, str], int, str]] = {
    # structure
    "empty body": (b"", {}, 400, "not valid JSON"),
    "nested JSON": (DEEP, {}, 400, "nested too deeply"),
    "nested data": (_tensor(data=json.loads("[" * 500 + "]" * 500)), {}, 400, "values for shape"),
    "deep data": (b'{"inputs": [{"name": "image", "shape": [1,3,8,8], "datatype": "FP32", "data": '
                  + DEEP + b"}]}", {}, 400, "nested too deeply"),
    "not UTF-8": (b"\xff\xfe{}", {}, 400, "not valid JSON"),
    "JSON list": (b"[1, 2]", {}, 400, "non-empty 'inputs'"),
    "huge integer": (b'{"inputs": [{"name": "image", "shape": [' + b"9" * 5000 + b', 3, 8, 8]}]}', {},
                     400, "not valid JSON"),
    "unknown field": (_request(priority=1), {}, 400, r"unsupported field\(s\) \['priority'\]"),
    "id not a string": (_request(id=5), {}, 400, "'id' must be a string"),
    # outputs and parameters: checked before the teacher runs, not after
    "outputs 5": (_request(outputs=5), {}, 400, "'outputs' must be a list"),
    "outputs of strings": (_request(outputs=["depth"]), {}, 400, "each output must be a JSON object"),
    "unknown output": (_request(outputs=[{"name": "normals"}]), {}, 400, "'normals' unknown"),
    "output twice": (_request(outputs=[{"name": "depth"}] * 2), {}, 400, "asked twice"),
    "binary_data not bool": (_request(outputs=[{"name": "depth", "parameters": {"binary_data": "yes"}}]),
                             {}, 400, "binary_data must be true or false"),
    "output parameter": (_request(outputs=[{"name": "depth", "parameters": {"classification": 3}}]),
                         {}, 400, "unsupported field"),
    "parameters 5": (_request(parameters=5), {}, 400, "'parameters' must be a JSON object"),
    "binary_data_output 1": (_request(parameters={"binary_data_output": 1}), {}, 400, "true or false"),
    "misspelt parameter": (_request(parameters={"binary_data_ouput": True}), {}, 400, "binary_data_ouput"),
    # inputs
    "inputs 5": (json.dumps({"inputs": 5}).encode(), {}, 400, "non-empty 'inputs'"),
    "input not object": (json.dumps({"inputs": [5]}).encode(), {}, 400, "JSON object"),
    "no name": (_tensor(name=None), {}, 400, "without a 'name'"),
    "name 5": (_tensor(name=5), {}, 400, "without a 'name'"),
    "wrong name": (_tensor(name="rgb"), {}, 400, "exactly one input 'image'"),
    "two inputs": (json.dumps({"inputs": [GOOD, {**GOOD, "name": "b"}]}).encode(), {}, 400, "exactly one"),
    "same input twice": (json.dumps({"inputs": [GOOD, GOOD]}).encode(), {}, 400, "given twice"),
    "input field": (_tensor(contents=[1]), {}, 400, r"unsupported field\(s\) \['contents'\]"),
    "shared memory": (_tensor(parameters={"shared_memory_region": "r"}), {}, 400, "shared_memory_region"),
    "datatype 5": (_tensor(datatype=5), {}, 400, "datatype 5 not allowed"),
    "datatype INT8": (_tensor(datatype="INT8"), {}, 400, "'INT8' not allowed"),
    "shape string": (_tensor(shape="1,3,8,8"), {}, 400, "shape must be a list"),
    "shape bools": (_tensor(shape=[True, 3, 8, 8]), {}, 400, "shape must be a list"),
    "shape negative": (_tensor(shape=[1, 3, -8, 8]), {}, 400, "non-negative"),
    "shape rank": (_tensor(shape=[3, 8, 8]), {}, 400, "rank 3"),
    "shape huge": (_tensor(shape=[10**30, 3, 8, 8]), {}, 400, "batch .* outside"),
    "shape zero": (_tensor(shape=[0, 3, 8, 8], data=[]), {}, 400, "batch 0 outside"),
    "too tall": (_tensor(shape=[1, 3, 10**12, 8]), {}, 400, "height .* outside"),
    "too many pixels": (_tensor(shape=[4, 3, 128, 128]), {}, 413, "pixels exceeds 16384"),
    "channels": (_tensor(shape=[1, 1, 8, 8], data=[0.5] * 64), {}, 400, r"\(B,3,H,W\)"),
    # data
    "data missing": (_tensor(data=None), {}, 400, "'data' must be a flat list"),
    "data object": (_tensor(data={"0": 1}), {}, 400, "'data' must be a flat list"),
    "data strings": (_tensor(data=["0.5"] * 192), {}, 400, "found str"),
    "data bools": (_tensor(data=[True] * 192), {}, 400, "found bool"),
    "data with null": (_tensor(data=[0.5] * 191 + [None]), {}, 400, "found NoneType"),
    "data count": (_tensor(data=[0.5] * 10), {}, 400, "10 values for shape"),
    "UINT8 floats": (_tensor(datatype="UINT8", data=[0.5] * 192), {}, 400, "found float"),
    "UINT8 range": (_tensor(datatype="UINT8", data=[256] * 192), {}, 400, "not a list of UINT8"),
    "UINT8 negative": (_tensor(datatype="UINT8", data=[-1] * 192), {}, 400, "not a list of UINT8"),
    "JSON NaN": (_request().replace(b"0.5]", b"NaN]"), {}, 400, "NaN or infinite"),
    "JSON Infinity": (_request().replace(b"0.5]", b"-Infinity]"), {}, 400, "NaN or infinite"),
    "beyond FP32": (_request().replace(b"0.5]", b"1e39]"), {}, 400, "NaN or infinite"),
    "0..255 as FP32": (_tensor(data=[255.0] * 192), {}, 400, r"in \[0,1\], got \[255, 255\].*UINT8"),
    "negative FP32": (_tensor(data=[-0.5] * 192), {}, 400, r"\[0,1\]"),
    # binary extension
    "binary NaN": (*_bin(FP32_8, NAN.tobytes()), 400, "NaN or infinite"),
    "binary inf": (*_bin(FP32_8, INF.tobytes()), 400, "NaN or infinite"),
    "dtype mismatch": (*_bin({**FP32_8, "datatype": "UINT8"}, bytes(768)), 400, "needs 192 bytes"),
    "size mismatch": (*_bin({**FP32_8, "parameters": {"binary_data_size": 100}}, bytes(100)), 400,
                      "needs 768 bytes"),
    "size as string": (*_bin({**FP32_8, "parameters": {"binary_data_size": "768"}}, bytes(768)), 400,
                       "binary_data_size '768'"),
    "size negative": (*_bin({**FP32_8, "parameters": {"binary_data_size": -768}}, bytes(768)), 400,
                      "needs 768 bytes"),
    "truncated binary": (*_bin(FP32_8, bytes(700)), 400, "ends 68 bytes early"),
    "trailing bytes": (*_bin(FP32_8, bytes(800)), 400, "32 unclaimed bytes"),
    "header length text": (_request(), {HEADER_LENGTH: "abc"}, 400, "not an integer"),
    "header length 0": (_request(), {HEADER_LENGTH: "0"}, 400, "outside 1"),
    "header length past end": (_request(), {HEADER_LENGTH: "99999"}, 400, "outside 1"),
    "header length mid-JSON": (_request(), {HEADER_LENGTH: "20"}, 400, "not valid JSON"),
    # sizes and media types
    "JSON too big": (_tensor(data=[0.5] * 70_000), {}, 413, "limit for JSON requests"),
    "body too big": (bytes((1 << 20) + 1), {HEADER_LENGTH: "1"}, 413, "limit for requests"),
    "JSON reply too big": (_tensor(shape=[1, 3, 24, 24], data=[0.5] * 1728), {}, 400, "ask for binary"),
    "text/plain": (_request(), {"Content-Type": "text/plain"}, 415, "not supported"),
    "form": (_request(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, "not supported"),
    "multipart": (_request(), {"Content-Type": "multipart/form-data; boundary=x"}, 415, "not supported"),
}


@pytest.fixture(scope="module")
def counted() -> Any:
    teacher = _CountingTeacher()
    app = create_app(teacher, "c", token=TOKEN, limits=HOSTILE_LIMITS, max_wait_ms=0, server=HOSTILE_SERVER)
    with BackgroundServer(app) as url:
        yield types.SimpleNamespace(url=url, teacher=teacher, auth={"Authorization": f"Bearer {TOKEN}"})


def test_hostile_requests_get_4xx_with_a_reason_before_the_teacher_runs(counted: Any) -> None:
    infer = f"{counted.url}/v2/models/c/infer"
    with httpx.Client(timeout=30) as http:
        for name, (body, headers, status, reason) in HOSTILE.items():
            reply = http.post(infer, content=body, headers={**counted.auth, **headers})
            assert reply.status_code == status, (name, reply.status_code, reply.text[:300])
            assert re.search(reason, reply.json()["error"]), (name, reply.json())
        assert counted.teacher.calls == 0  # every defect found before the teacher ran
        # The same requests made right are answered, JSON and binary alike.
        ok = http.post(infer, content=_request(id="ok"), headers=counted.auth)
        assert ok.status_code == 200 and ok.json()["id"] == "ok"
        body, headers = _bin(FP32_8, np.full((1, 3, 8, 8), 0.5, np.float32).tobytes())
        ok = http.post(infer, content=body, headers={**counted.auth, **headers,
                                                     "Content-Type": "application/octet-stream"})
        assert ok.status_code == 200 and counted.teacher.calls == 2
        big = json.dumps({"inputs": [{**GOOD, "shape": [1, 3, 24, 24], "data": [0.5] * 1728}],
                          "outputs": [{"name": "depth", "parameters": {"binary_data": True}}]}).encode()
        ok = http.post(infer, content=big, headers=counted.auth)  # too big as JSON, fine in binary
        assert ok.status_code == 200 and int(ok.headers[HEADER_LENGTH]) < len(ok.content)


def test_bearer_scheme_is_case_insensitive_and_blank_tokens_are_refused(counted: Any,
                                                                         monkeypatch: Any) -> None:
    meta = f"{counted.url}/v2/models/c"
    for value in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer   {TOKEN}", f"bEaReR {TOKEN}"):
        assert httpx.get(meta, headers={"Authorization": value}).status_code == 200, value
    for value in (f"Basic {TOKEN}", f"Bearer{TOKEN}", f"Bearer {TOKEN}x", "Bearer", ""):
        assert httpx.get(meta, headers={"Authorization": value}).status_code == 401, value
    for blank in ("", " ", "\t", " \n "):
        with pytest.raises(SystemExit, match="bearer token must be non-blank"):
            teacher_server.main(["--teacher", "t", "--host", "0.0.0.0", "--token", blank])
        with pytest.raises(SystemExit, match="bearer token must be non-blank"):  # even on loopback
            teacher_server.main(["--teacher", "t", "--token", blank])
        with pytest.raises(ValueError, match="non-blank"):
            create_app(_CountingTeacher(), "c", token=blank)
    monkeypatch.setenv(teacher_server.TOKEN_ENV, "  ")
    with pytest.raises(SystemExit, match="non-blank"):
        teacher_server.main(["--teacher", "t", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit, match="non-blank"):  # HTTP strips it: it could never match
        teacher_server.main(["--teacher", "t", "--token", "abc "])


def _raw(url: str, data: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(data)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's own
    timeout fails the test if it never does)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:  # closed with data unread on its side: closed all the same
        pass
    sock.close()
    return b"".join(chunks)


def _post_head(path: str, length: int, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def test_work_beyond_the_limit_gets_503_and_retry_after_without_reading_the_body() -> None:
    gate = threading.Event()
    teacher = _CountingTeacher(gate)
    server = ServerLimits(max_inflight=2, retry_after_s=3)
    app = create_app(teacher, "c", token=TOKEN, max_batch=1, max_wait_ms=0, server=server)
    image = np.full((1, 3, 8, 8), 0.5, np.float32)
    with BackgroundServer(app) as url:
        results: list[Any] = []

        def ask() -> None:
            with TeacherClient(url, "c", token=TOKEN, retries=0) as client:
                results.append(client.infer(image))

        threads = [threading.Thread(target=ask) for _ in range(server.max_inflight)]
        for thread in threads:
            thread.start()
        wait_until(lambda: teacher.entered.is_set() and app.state.slots.busy == server.max_inflight,
                   what="two requests in progress, one in the teacher")
        # The N+1th: refused from its headers, before any of its (announced) body is sent.
        sock = _raw(url, _post_head("/v2/models/c/infer", 900_000, f"{HEADER_LENGTH}: 10\r\n"))
        reply = _read_all(sock).decode()
        assert reply.startswith("HTTP/1.1 503") and "retry-after: 3" in reply.lower(), reply
        assert "busy: 2 requests in progress" in reply
        with TeacherClient(url, "c", token=TOKEN, retries=0) as client:
            with pytest.raises(TeacherBusy, match="busy") as busy:
                client.infer(image)
            assert busy.value.retry_after_s == 3 and client.breaker.consecutive == 0
        assert teacher.calls == 1 and app.state.slots.busy == server.max_inflight
        gate.set()
        for thread in threads:
            thread.join(timeout=30)
        assert len(results) == 2 and all(np.array_equal(r, np.full((1, 1, 8, 8), 2, np.float32))
                                         for r in results)
        wait_until(lambda: app.state.slots.busy == 0, what="slots given back")
        with TeacherClient(url, "c", token=TOKEN, retries=0) as client:
            assert client.infer(image).shape == (1, 1, 8, 8)


def test_slow_and_idle_connections_are_closed_after_their_timeouts(caplog: Any) -> None:
    server = ServerLimits(header_timeout_s=0.3, body_timeout_s=0.3, keep_alive_s=0.3, max_header_bytes=2048)
    app = create_app(_CountingTeacher(), "c", token=TOKEN, max_wait_ms=0, server=server)
    with BackgroundServer(app) as url:
        silent = [_raw(url, b"") for _ in range(5)]  # connect, send nothing
        dribbling = [_raw(url, b"POST /v2/models/c/infer HTTP/1.1\r\nHost: t\r\n") for _ in range(3)]
        for sock in silent + dribbling:
            assert _read_all(sock) == b""  # closed by the server, without an answer
        slow_body = _raw(url, _post_head("/v2/models/c/infer", 1000, f"{HEADER_LENGTH}: 10\r\n") + b"x" * 10)
        reply = _read_all(slow_body).decode()
        assert reply.startswith("HTTP/1.1 408") and "not received within 0.3 s" in reply, reply
        head = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n"
        idle = _raw(url, head + b"\r\n")  # answered, then idle on keep-alive
        assert _read_all(idle).startswith(b"HTTP/1.1 200")
        huge = _raw(url, head + b"X-Pad: " + b"a" * 4096)  # headers that never end
        assert _read_all(huge).startswith(b"HTTP/1.1 400")
        # A client that vanishes mid-body is no server error, and gives its slot back.
        gone = _raw(url, _post_head("/v2/models/c/infer", 1000, f"{HEADER_LENGTH}: 10\r\n") + b"x" * 10)
        wait_until(lambda: app.state.slots.busy == 1, what="the request in progress")
        gone.close()
        wait_until(lambda: app.state.slots.busy == 0, what="the slot given back")
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert "unhandled error" not in caplog.text and "Traceback" not in caplog.text


def test_a_client_that_takes_none_of_its_reply_is_disconnected() -> None:
    server = ServerLimits(reply_timeout_s=0.3, keep_alive_s=600)  # only the reply timeout may close it
    app = create_app(_CountingTeacher(), "c", max_wait_ms=0, server=server)
    background = BackgroundServer(app)
    images = np.zeros((1, 3, 2048, 2048), np.uint8)  # a 16 MiB depth: more than the socket buffers
    body, length = encode_message({"outputs": [{"name": "depth", "parameters": {"binary_data": True}}]},
                                  "inputs", {"image": images}, binary=True)
    with background as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the reply cannot hide in it
        sock.settimeout(20)
        sock.connect((host, int(port)))
        sock.sendall(_post_head("/v2/models/c/infer", len(body), f"{HEADER_LENGTH}: {length}\r\n") + body)
        connections = background.server.server_state.connections
        wait_until(lambda: not connections, timeout=30, what="the stalled reader disconnected")
        received = len(_read_all(sock))
    assert 0 < received < 16 << 20  # cut off, its buffer dropped


def test_connections_beyond_the_limit_get_503() -> None:
    app = create_app(_CountingTeacher(), "c", max_wait_ms=0, server=ServerLimits(max_connections=3))
    background = BackgroundServer(app)
    with background as url:
        held = [_raw(url, b"") for _ in range(2)]
        connections = background.server.server_state.connections
        wait_until(lambda: len(connections) == 2, what="two idle connections accepted")
        with httpx.Client() as http:
            assert http.get(f"{url}/v2/health/live").status_code == 503
        for sock in held:
            sock.close()
        with httpx.Client() as http:
            assert wait_until(lambda: http.get(f"{url}/v2/health/live").status_code == 200,
                              what="connections freed")


def test_client_honours_retry_after_without_tripping_the_breaker() -> None:
    app, seen = _fake_teacher_app([503, 503], headers={"Retry-After": "2"})
    sleeps: list[float] = []
    images = np.random.default_rng(3).random((1, 3, 8, 8), dtype=np.float32)
    with BackgroundServer(app) as url, TeacherClient(url, "fake", retries=3, backoff_s=0.01,
                                                     breaker_failures=1, sleep=sleeps.append) as client:
        depth = client.infer(images)
    assert len(seen) == 3 and sleeps == [2, 2]  # Retry-After, not the 0.01/0.02 backoff
    assert np.array_equal(depth, images.mean(axis=1, keepdims=True))
    app, seen = _fake_teacher_app([503] * 5, headers={"Retry-After": "3600"})
    sleeps.clear()
    with BackgroundServer(app) as url, TeacherClient(url, "fake", retries=2, breaker_failures=1,
                                                     max_retry_after_s=5, sleep=sleeps.append) as client:
        with pytest.raises(TeacherBusy, match="busy on 3 attempts.*boom") as busy:
            client.infer(images)
        assert not client.breaker.is_open  # busy is alive: a later call still goes out
    assert len(seen) == 3 and sleeps == [5, 5] and busy.value.retry_after_s == 3600
    app, seen = _fake_teacher_app([429, 408], headers={"Retry-After": "1"})  # a proxy's 429; a slow upload
    sleeps.clear()
    with BackgroundServer(app) as url, TeacherClient(url, "fake", retries=2, backoff_s=0.01,
                                                     sleep=sleeps.append) as client:
        assert client.infer(images).shape == (1, 1, 8, 8)
    assert len(seen) == 3 and sleeps == [1, 0.02]


def test_batcher_skips_a_request_abandoned_while_queued() -> None:
    """An abandoned request gives its slot back at once: its queued job must not still
    cost a teacher call (and memory) later."""
    gate = threading.Event()
    teacher = _CountingTeacher(gate)
    image = np.full((1, 3, 8, 8), 0.5, np.float32)

    async def scenario() -> None:
        batcher = Batcher(teacher, max_batch=1, max_wait_ms=0)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(image))
        await asyncio.get_running_loop().run_in_executor(None, teacher.entered.wait)
        second = asyncio.ensure_future(batcher.submit(image))
        await asyncio.sleep(0)  # one step: the job is queued, the request awaits its answer
        second.cancel()
        gate.set()
        assert (await first).shape == (1, 1, 8, 8)
        assert (await batcher.submit(image)).shape == (1, 1, 8, 8)
        await batcher.stop()

    asyncio.run(scenario())
    assert teacher.calls == 2
