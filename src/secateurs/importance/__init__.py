"""Importance signals: what a unit (block, head, channel) contributes, measured on calibration data."""
