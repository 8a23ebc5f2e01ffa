"""The `depthkd` verbs this package adds (entry-point group ``depthkd.verbs`` in setup.py).

Importing this table imports nothing of ROS: the core's `depthkd --help` stays instant.
"""

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("depthkd_ros.tools.demo", "run the live depth node on the bundled sequence"),
    "bench-node": ("depthkd_ros.tools.bench_node",
                   "measure the live node: inference, overhead, rates, memory"),
    "bench-distill": ("depthkd_ros.tools.bench_distill",
                      "on-robot distillation loop: keyframes/s, teacher ms, steps/s, AbsRel"),
    "bench-teacher": ("depthkd_ros.tools.bench_teacher",
                      "teacher_server's peak memory under its largest allowed requests and under load"),
}
