"""Developer tools around the live nodes: the demo, node benchmarks and the in-process
harness they share. Their `depthkd` verbs are listed in ``depthkd_ros.verbs``."""
