"""The `depthkd` verbs this package adds (entry-point group ``depthkd.verbs`` in setup.py).

Importing this table imports nothing of ROS: the core's `depthkd --help` stays instant.
"""

VERBS: dict[str, tuple[str, str]] = {
    "demo": ("depthkd_ros.tools.demo", "run the live depth node on the bundled sequence"),
    "bench-node": ("depthkd_ros.tools.bench_node",
                   "measure the live node: inference, overhead, rates, memory"),
    "bench-distill": ("depthkd_ros.tools.bench_distill",
                      "on-robot distillation loop: keyframes/s, teacher ms, steps/s, AbsRel"),
    "fuzz-node": ("depthkd_ros.tools.fuzz_node",
                  "feed a real depth_node a seeded hostile mix: crashes, peak RSS, output drift"),
    "bench-teacher": ("depthkd_ros.tools.bench_teacher",
                      "teacher_server's peak memory under its largest allowed requests and under load"),
}
