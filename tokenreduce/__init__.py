"""tokenreduce: token merging and pruning for timm Vision Transformers.

    import timm, tokenreduce
    model = timm.create_model("vit_small_patch16_224")
    tokenreduce.apply(model, "tome", r=13)   # model(images) still returns logits
    tokenreduce.stats(model)                 # tokens per layer and MACs of the last pass
    tokenreduce.export_onnx(model.eval(), images, "model.onnx")   # dynamic batch (docs/export.md)
    tokenreduce.remove(model)
"""

from tokenreduce import models  # noqa: F401  (registers the offline models with timm)
from tokenreduce.api import apply, reducer_of, remove, stats
from tokenreduce.cost import match_macs, match_visual_tokens, reducer_macs
from tokenreduce.errors import ConfigError, UnsupportedModelError
from tokenreduce.export import export_onnx, export_program
from tokenreduce.reducers import (
    TokenReducer,
    available,
    create_reducer,
    reducer_class,
    reducer_defaults,
    register_reducer,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "TokenReducer",
    "UnsupportedModelError",
    "apply",
    "available",
    "create_reducer",
    "export_onnx",
    "export_program",
    "match_macs",
    "match_visual_tokens",
    "reducer_class",
    "reducer_defaults",
    "reducer_macs",
    "reducer_of",
    "register_reducer",
    "remove",
    "stats",
]
