"""Pruning methods: each is a config, prepare passes, training hooks, a plan and finalize passes
on the same core (see base.py), registered by name. Importing this package registers the
built-in ones."""

from graphprune.methods import baselines  # noqa: F401  (registers slimming, fpgm, ...)
from graphprune.methods.base import (
    ConfigOption,
    Method,
    MethodConfig,
    get_method,
    method_names,
    option,
    register_method,
    unregister_method,
)
from graphprune.methods.chex import Chex, ChexConfig
from graphprune.methods.csgd import CSGD, CSGDConfig
from graphprune.methods.gsm import GSM, GSMConfig
from graphprune.methods.magnitude import Magnitude, MagnitudeConfig
from graphprune.methods.resrep import ResRep, ResRepConfig

DEFAULT_METHOD = Magnitude.name  # what compress() and the CLI use when no method is named

__all__ = [
    "CSGD",
    "DEFAULT_METHOD",
    "Chex",
    "ChexConfig",
    "GSM",
    "CSGDConfig",
    "ConfigOption",
    "GSMConfig",
    "Magnitude",
    "MagnitudeConfig",
    "Method",
    "MethodConfig",
    "ResRep",
    "ResRepConfig",
    "get_method",
    "method_names",
    "option",
    "register_method",
    "unregister_method",
]
