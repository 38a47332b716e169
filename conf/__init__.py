"""Hydra configuration of `python -m tokenreduce`, installed as the package `tokenreduce.conf`."""
