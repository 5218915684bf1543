"""Graph rewrites, one module per pass (installed as ``graphprune.passes``)."""

from .cleanup import cleanup
from .fold_compactors import fold_compactors
from .fuse_bn import fuse_bn
from .insert_compactors import compactable_groups, insert_compactors
from .merge_channels import merge_channels, mergeable_groups
from .prune_channels import prune_channels

__all__ = [
    "cleanup",
    "compactable_groups",
    "fold_compactors",
    "fuse_bn",
    "insert_compactors",
    "merge_channels",
    "mergeable_groups",
    "prune_channels",
]
