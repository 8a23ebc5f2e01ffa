"""Run the teacher server on the workstation (see docs/teacher_server.md).

    ros2 launch depthkd_ros teacher_server.launch.py teacher:=/models/dpt_large
    ros2 launch depthkd_ros teacher_server.launch.py teacher:=t.onnx host:=0.0.0.0 \\
        token_file:=$HOME/.teacher_token ssl_keyfile:=key.pem ssl_certfile:=cert.pem

The token is passed as a file only: launch arguments end up in logs.
"""

from __future__ import annotations

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "depthkd_ros"
SIGTERM_TIMEOUT_S = "30"

ARGUMENTS = {
    "teacher": ("", "teacher: HF folder, .onnx, TorchScript archive or depthkd checkpoint (required)"),
    "model_name": ("teacher", "name in /v2/models/<name>"),
    "host": ("127.0.0.1", "bind address; anything but loopback needs token_file"),
    "port": ("8000", "TCP port"),
    "token_file": ("", "file holding the bearer token"),
    "device": ("cpu", "torch device for torch teachers"),
    "max_batch": ("8", "images per teacher call"),
    "max_body_mb": ("64", "largest request accepted, MiB"),
    # Bounds (docs/teacher_server.md, "Bounds"); empty: the program's default.
    "max_json_mb": ("", "largest JSON part of a request, MiB"),
    "max_pixels": ("", "largest batch*height*width of a request"),
    "max_inflight": ("", "requests in progress at once; more get 503 + Retry-After"),
    "max_json_reply_values": ("", "largest depth answered as JSON"),
    "body_timeout_s": ("", "time allowed to send a request body"),
    "header_timeout_s": ("", "time allowed to send the request headers"),
    "max_connections": ("", "open connections; a request beyond gets 503"),
    "ssl_keyfile": ("", "TLS private key (with ssl_certfile)"),
    "ssl_certfile": ("", "TLS certificate chain (with ssl_keyfile)"),
}


def _server(context: object) -> list:
    def value(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    if not value("teacher"):
        raise ValueError("teacher_server.launch.py needs teacher:=<path>")
    arguments = []
    for name in ARGUMENTS:
        if value(name):  # empty optional arguments are left to the program's defaults
            arguments += [f"--{name.replace('_', '-')}", value(name)]
    # On Ctrl-C the server finishes its requests, then Python tears torch down: seconds on
    # a busy machine, past launch's default 5 s before it escalates to SIGTERM.
    return [Node(package=PACKAGE, executable="teacher_server", name="teacher_server",
                 arguments=arguments, output="screen", sigterm_timeout=SIGTERM_TIMEOUT_S)]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=_server)])
