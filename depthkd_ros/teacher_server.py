"""Serve a depthkd teacher over HTTP (KServe v2 protocol) for on-robot distillation.

    teacher_server --teacher /models/dpt_large --model-name teacher
    ros2 run depthkd_ros teacher_server --teacher t.onnx --host 0.0.0.0 --token-file ~/.teacher_token \\
        --ssl-keyfile key.pem --ssl-certfile cert.pem

Secure by default: binds 127.0.0.1; any other address needs a bearer token (from
--token-file, $DEPTHKD_TEACHER_TOKEN or --token). A plain program: no rclpy needed.
See docs/teacher_server.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

# Light (numpy, fastapi): the arguments are checked before torch or the teacher load.
from depthkd_core.serving.protocol import TensorLimits
from depthkd_core.serving.server import ServerLimits, check_token

TOKEN_ENV = "DEPTHKD_TEACHER_TOKEN"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IPs (127.0.0.0/8, ::1); any other name is remote."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse (ValueError) to listen beyond loopback without a token, or with an unusable
    one (blank, whitespace: it passed this check once and then matched no request)."""
    check_token(token)
    if not is_loopback(host) and not token:
        raise ValueError(f"refusing to bind {host} without a bearer token: pass --token-file, "
                         f"${TOKEN_ENV} or --token (or bind 127.0.0.1 and use a proxy)")


def read_token(args: argparse.Namespace) -> str | None:
    """--token-file, then --token, then $DEPTHKD_TEACHER_TOKEN; None when none is set."""
    if args.token_file:
        path = Path(args.token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"token file not found: {path}")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    # Given but blank is refused by check_bind, never taken for "no token".
    return args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None


def strip_ros_args(argv: list[str]) -> list[str]:
    """``argv`` without its ROS arguments.

    launch_ros appends ``--ros-args -r __node:=NAME`` to every Node's command line, so
    ``teacher_server.launch.py`` hands this program arguments argparse does not know.
    rcl's rule: each ``--ros-args`` opens a section that ``--`` or the end closes (what
    rclpy.utilities.remove_ros_args does; this is a plain program, it needs no rclpy).
    """
    kept, in_ros = [], False
    for arg in argv:
        if arg == "--ros-args":
            in_ros = True
        elif in_ros and arg == "--":
            in_ros = False
        elif not in_ros:
            kept.append(arg)
    return kept


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="teacher_server", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="teacher: HF folder, .onnx, TorchScript archive or depthkd checkpoint")
    parser.add_argument("--model-name", default="teacher", help="name in /v2/models/<name>")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", help=f"bearer token (visible in ps: prefer --token-file or ${TOKEN_ENV})")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--device", default="cpu", help="torch device for torch teachers")
    parser.add_argument("--max-batch", type=int, default=8, help="images per teacher call (and per request)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long to wait to fill a batch")
    tensors, server = TensorLimits(), ServerLimits()
    parser.add_argument("--max-body-mb", type=float, default=tensors.max_body_bytes / 2**20,
                        help="largest request body (MiB)")
    parser.add_argument("--max-json-mb", type=float, default=tensors.max_json_bytes / 2**20,
                        help="largest JSON part of a request (MiB): the whole body without binary tensors")
    parser.add_argument("--max-size", type=int, default=tensors.max_height, help="largest image height/width")
    parser.add_argument("--max-pixels", type=int, default=tensors.max_pixels,
                        help="largest batch*height*width of a request")
    parser.add_argument("--max-inflight", type=int, default=server.max_inflight,
                        help="inference requests in progress at once; more get 503 + Retry-After")
    parser.add_argument("--retry-after-s", type=int, default=server.retry_after_s,
                        help="Retry-After (s) sent with a 503")
    parser.add_argument("--max-json-reply-values", type=int, default=server.max_json_reply_values,
                        help="largest depth (batch*height*width) answered as JSON; larger needs binary")
    parser.add_argument("--body-timeout-s", type=float, default=server.body_timeout_s,
                        help="time allowed to send a request body (else 408)")
    parser.add_argument("--header-timeout-s", type=float, default=server.header_timeout_s,
                        help="time allowed to send the request line and headers (else closed)")
    parser.add_argument("--reply-timeout-s", type=float, default=server.reply_timeout_s,
                        help="time a client has to drain a reply that filled the send buffer")
    parser.add_argument("--keep-alive-s", type=float, default=server.keep_alive_s,
                        help="idle keep-alive connections are closed after this")
    parser.add_argument("--max-connections", type=int, default=server.max_connections,
                        help="open connections; a request beyond gets 503")
    parser.add_argument("--max-header-kb", type=float, default=server.max_header_bytes / 2**10,
                        help="largest request line plus headers (KiB)")
    parser.add_argument("--ssl-keyfile", help="TLS private key (uvicorn), with --ssl-certfile")
    parser.add_argument("--ssl-certfile", help="TLS certificate chain (uvicorn), with --ssl-keyfile")
    parser.add_argument("--log-level", default="info")
    return parser


def _check_tls(args: argparse.Namespace) -> None:
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    for path in (args.ssl_keyfile, args.ssl_certfile):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"TLS file not found: {path}")


def limits_of(args: argparse.Namespace) -> tuple[TensorLimits, ServerLimits]:
    """The bounds the arguments ask for; ValueError names a bad one."""
    tensors = TensorLimits(max_batch=args.max_batch, max_height=args.max_size, max_width=args.max_size,
                           max_pixels=args.max_pixels, max_body_bytes=int(args.max_body_mb * 2**20),
                           max_json_bytes=int(args.max_json_mb * 2**20))
    server = ServerLimits(max_inflight=args.max_inflight, retry_after_s=args.retry_after_s,
                          max_json_reply_values=args.max_json_reply_values,
                          body_timeout_s=args.body_timeout_s, header_timeout_s=args.header_timeout_s,
                          reply_timeout_s=args.reply_timeout_s, keep_alive_s=args.keep_alive_s,
                          max_connections=args.max_connections,
                          max_header_bytes=int(args.max_header_kb * 2**10))
    return tensors, server


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(strip_ros_args(sys.argv[1:] if argv is None else argv))
    try:
        token = read_token(args)
        check_bind(args.host, token)
        _check_tls(args)
        tensors, server = limits_of(args)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"teacher_server: {exc}") from None
    # Heavy imports only once the arguments are known to be usable.
    import uvicorn

    from depthkd_core.models.teachers import load_teacher
    from depthkd_core.serving.server import create_app
    from depthkd_core.serving.transport import uvicorn_config

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _release_large_buffers()
    teacher = load_teacher(args.teacher, device=args.device)
    app = create_app(teacher, args.model_name, token=token, limits=tensors,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, server=server)
    logging.getLogger(__name__).info("serving %r as '%s' on %s:%d (%s, %s)", teacher, args.model_name,
                                     args.host, args.port, "TLS" if args.ssl_certfile else "plain HTTP",
                                     "token required" if token else "no token")
    _serve(uvicorn, uvicorn_config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile))


# glibc's M_MMAP_THRESHOLD, and the size from which buffers (request bodies, images,
# depth) get their own mapping.
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 1 << 20


def _release_large_buffers() -> None:
    """Give large buffers back to the system when freed. glibc raises its mmap threshold
    each time such a buffer is freed, after which large buffers come from the heap and
    stay in the RSS: after a burst of large requests the server kept ~200 MB it no longer
    used. A fixed threshold keeps them mapped, so the RSS falls back after the burst."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError, TypeError):  # not glibc: its own allocator policy stays
        logging.getLogger(__name__).debug("mallopt unavailable (libc %s)", name)


def _serve(uvicorn: Any, config: Any) -> None:
    """uvicorn's ``run`` made quiet for Ctrl-C under ``ros2 launch``, where SIGINT arrives
    twice: from the terminal (the whole process group) and forwarded by launch."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn takes a second SIGINT as "force exit" and cancels its own graceful
            # shutdown (a CancelledError traceback); the shutdown already under way is enough.
            if not (self.should_exit and sig == signal.SIGINT):
                super().handle_exit(sig, frame)

    # After a graceful shutdown uvicorn re-raises the signal to the handler it found:
    # Python's default makes that a KeyboardInterrupt traceback, and a late second SIGINT
    # during interpreter teardown would kill the process (exit -2). SIG_IGN, set only now
    # so that Ctrl-C still stops a long teacher load, is what uvicorn restores.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = Server(config)
    server.run()
    if not server.started:
        raise SystemExit("teacher_server: the server did not start (see the log above)")


if __name__ == "__main__":
    main()
