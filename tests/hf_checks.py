"""Refusals every transformers adapter makes alike, checked on each family's own models."""

from __future__ import annotations

import sys

import pytest

import tokenreduce
from tokenreduce.errors import ConfigError, UnsupportedModelError


def check_flash_attention_refused(model) -> None:
    """A model set to an attention implementation that takes no float mask is refused, untouched."""
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='flash_attention_2'; supported: 'eager'"):
        tokenreduce.apply(model, "tome", r=2)
    assert not hasattr(model, "_tokenreduce")


def check_missing_transformers_refused(model, modules, monkeypatch) -> None:
    """With the adapter's transformers `modules` not importable, applying says how to install them."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # an import of it now fails
    with pytest.raises(ConfigError, match=r"install it with pip install 'tokenreduce\[hf\]'"):
        tokenreduce.apply(model, "tome", r=2)
    assert not hasattr(model, "_tokenreduce")
