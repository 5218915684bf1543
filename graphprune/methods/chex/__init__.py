"""CHEX: prune and regrow channels while training (see method.py)."""

from graphprune.methods.chex.method import Chex, ChexConfig, ChexStats

__all__ = ["Chex", "ChexConfig", "ChexStats"]
