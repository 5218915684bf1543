"""ResRep: compactors, gradient resetting, a MACs-targeted mask schedule, exact folding."""

from graphprune.methods.resrep.method import ResRep, ResRepConfig, ResRepStats, resrep_finalize
from graphprune.methods.resrep.schedule import ResRepSchedule

__all__ = ["ResRep", "ResRepConfig", "ResRepSchedule", "ResRepStats", "resrep_finalize"]
