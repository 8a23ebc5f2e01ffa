"""Serving a depthkd teacher over the KServe v2 / Open Inference Protocol, and its client."""
