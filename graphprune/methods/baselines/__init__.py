"""The classic pruning baselines on the masking base (graphprune.methods.masking): each a short
importance or regularizer over the same coupled groups, registered by name. Importing this
package registers them."""

from graphprune.methods.baselines.fpgm import FPGM, FPGMConfig
from graphprune.methods.baselines.hrank import HRank, HRankConfig
from graphprune.methods.baselines.slimming import (
    Polarization,
    PolarizationConfig,
    Slimming,
    SlimmingConfig,
)
from graphprune.methods.baselines.taylor import Taylor, TaylorConfig

__all__ = [
    "FPGM",
    "FPGMConfig",
    "HRank",
    "HRankConfig",
    "Polarization",
    "PolarizationConfig",
    "Slimming",
    "SlimmingConfig",
    "Taylor",
    "TaylorConfig",
]
