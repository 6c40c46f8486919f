"""Targets as plug-ins: one module per target registers its config, class and needs
(`registry.TargetSpec`); importing this package registers the built-in ones, in this order."""

# The registry keeps this import order: the config's, and the order the targets are built in
# (their initial weights draw from the global RNG in turn).
# isort: off
from m3i.mi.targets import category
from m3i.mi.targets import text
from m3i.mi.targets import dense
from m3i.mi.targets import pixels
from m3i.mi.targets import view_contrast
from m3i.mi.targets import view_regress

# isort: on
from m3i.mi.targets.base import RunContext, StepContext, Stream, Target, TargetConfig
from m3i.mi.targets.registry import TARGETS, DataInfo, TargetSpec, build_targets, information

__all__ = [
    "TARGETS",
    "DataInfo",
    "RunContext",
    "StepContext",
    "Stream",
    "Target",
    "TargetConfig",
    "TargetSpec",
    "build_targets",
    "category",
    "dense",
    "information",
    "pixels",
    "text",
    "view_contrast",
    "view_regress",
]
