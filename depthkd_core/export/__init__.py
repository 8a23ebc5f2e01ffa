"""ONNX export (``onnx_export``, needs torch) and ONNX Runtime inference (``runtime``).

Nothing is imported here: ``depthkd_core.export.runtime`` must load without
torch for the live ROS node.
"""
