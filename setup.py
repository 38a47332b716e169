"""Only the package list lives here; everything else is in pyproject.toml.

`conf/` sits at the repository root for users and is installed as the package `tokenreduce.conf`,
which pyproject.toml cannot express together with automatic package discovery. The project's Hydra
sweeper is installed as `hydra_plugins.tokenreduce_sweeper`, where Hydra looks for plugins.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def data_packages(folder: str, package: str) -> list[str]:
    """`package` (the repository's `folder`) and a package per folder below it. They hold data only,
    but setuptools warns about an unlisted folder inside a package, and ships listed packages' data."""
    base = ROOT / folder
    below = sorted(p.relative_to(base) for p in base.rglob("*") if p.is_dir() and "__pycache__" not in p.parts)
    return [package] + [".".join([package, *p.parts]) for p in below]


setup(packages=find_packages(include=["tokenreduce", "tokenreduce.*"]) + data_packages("conf", "tokenreduce.conf")
      + data_packages("tokenreduce/models/weights", "tokenreduce.models.weights")
      + ["hydra_plugins.tokenreduce_sweeper"])
