"""Graph rewrites, one module per pass (installed as ``graphprune.passes``)."""

from .prune_channels import prune_channels, round_plan, validate_plan

__all__ = ["prune_channels", "round_plan", "validate_plan"]
