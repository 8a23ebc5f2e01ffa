"""depthkd core: knowledge distillation for small monocular depth networks.

Importing this package (and ``geometry``, ``evaluate.metrics``, ``runtime``)
never imports torch or rclpy, so the live ROS node stays light.
"""

__version__ = "0.1.0"
