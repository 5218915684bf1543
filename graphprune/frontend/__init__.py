"""Tracing: torch.fx with a leaf policy, shapes on node.meta, train/eval mode helpers."""
