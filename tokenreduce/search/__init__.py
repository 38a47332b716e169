"""Searches that turn calibration data into reducer settings: per-layer schedules under a cost budget."""
