"""Only the package list lives here; everything else is in pyproject.toml.

`conf/` sits at the repository root for users and is installed as the package `tokenreduce.conf`,
which pyproject.toml cannot express together with automatic package discovery.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["tokenreduce", "tokenreduce.*"]) + ["tokenreduce.conf"])
