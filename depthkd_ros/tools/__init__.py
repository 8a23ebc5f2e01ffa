"""Command-line tools that drive the ROS nodes from outside."""
