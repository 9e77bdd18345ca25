"""Exact rewrites of a float model before quantization (smoothing; see :mod:`.smoothing`)."""
from .smoothing import (
    GroupScale,
    HeadLayout,
    SmoothGroup,
    SmoothReport,
    check_alpha,
    migration_scale,
    plan_smoothing,
    smooth,
    weight_statistic,
)

__all__ = ["GroupScale", "HeadLayout", "SmoothGroup", "SmoothReport", "check_alpha", "migration_scale",
           "plan_smoothing", "smooth", "weight_statistic"]
