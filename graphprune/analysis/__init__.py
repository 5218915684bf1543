"""Dependency analysis: channel atoms, the per-op rules, and the groups of coupled channels."""

from graphprune.analysis.builder import ChannelGraph, ChannelGroup, MacLayer, Member, Site
from graphprune.analysis.graph import analyze, build_channel_graph, prune_whole_heads

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "MacLayer",
    "Member",
    "Site",
    "analyze",
    "build_channel_graph",
    "prune_whole_heads",
]
