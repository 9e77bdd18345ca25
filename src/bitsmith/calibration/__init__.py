"""Calibration: activation statistics collected with forward hooks (see :mod:`.stats` for the file format)."""
from .stats import ChannelStats, load_stats, save_stats

__all__ = ["ChannelStats", "load_stats", "save_stats"]
