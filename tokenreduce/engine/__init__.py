"""Measurement and training loops around reduced models."""
