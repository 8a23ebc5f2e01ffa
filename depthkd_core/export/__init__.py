"""ONNX export with a parity check (``onnx_export``, needs torch).

The torch-free runtime that runs the exported files is ``depthkd_core.runtime``.
"""
