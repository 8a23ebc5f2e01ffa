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
    """Refuse (ValueError) to listen beyond loopback without a token."""
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
    return args.token or os.environ.get(TOKEN_ENV) or None


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
    parser = argparse.ArgumentParser(prog="teacher_server", description=__doc__.split("\n")[0])
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
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="largest request accepted")
    parser.add_argument("--max-size", type=int, default=2048, help="largest image height/width")
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


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(strip_ros_args(sys.argv[1:] if argv is None else argv))
    try:
        token = read_token(args)
        check_bind(args.host, token)
        _check_tls(args)
        if args.max_batch < 1 or args.max_body_mb <= 0 or args.max_size < 8:
            raise ValueError("--max-batch must be >= 1, --max-body-mb > 0, --max-size >= 8")
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"teacher_server: {exc}") from None
    # Heavy imports only once the arguments are known to be usable.
    import uvicorn

    from depthkd_core.models.teachers import load_teacher
    from depthkd_core.serving.protocol import TensorLimits
    from depthkd_core.serving.server import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    teacher = load_teacher(args.teacher, device=args.device)
    limits = TensorLimits(max_batch=args.max_batch, max_height=args.max_size, max_width=args.max_size,
                          max_body_bytes=int(args.max_body_mb * (1 << 20)))
    app = create_app(teacher, args.model_name, token=token, limits=limits,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    logging.getLogger(__name__).info("serving %r as '%s' on %s:%d (%s, %s)", teacher, args.model_name,
                                     args.host, args.port, "TLS" if args.ssl_certfile else "plain HTTP",
                                     "token required" if token else "no token")
    _serve(uvicorn, uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile))


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
