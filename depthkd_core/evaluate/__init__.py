"""Evaluation: depth metrics (``metrics``, numpy only), model cost (``profile``, torch)
and dataset reports plus the ``depthkd evaluate`` verb (``report``, torch).

Import the submodule you need; this package imports nothing so that the live
node can use ``evaluate.metrics`` without loading torch.
"""
