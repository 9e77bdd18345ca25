"""Calibration: activation statistics collected with forward hooks (see :mod:`.stats` for the file format)."""
from .collect import StatsAccumulator, collect_stats, select_modules, token_windows
from .stats import ChannelStats, load_stats, save_stats

__all__ = ["ChannelStats", "load_stats", "save_stats", "collect_stats", "StatsAccumulator", "select_modules", "token_windows"]
