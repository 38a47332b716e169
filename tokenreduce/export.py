"""Exporting a reduced model for deployment: `torch.export` with a symbolic batch, and ONNX from it.

Both are plain PyTorch calls (docs/export.md); these wrappers add what is easy to get wrong: the
batch dimension made symbolic, an example of batch 1 widened (a size-1 example would fix the
batch at 1), evaluation mode required, and a failure that names the reducer instead of pointing
into PyTorch's tracer.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from tokenreduce.adapters import is_patched
from tokenreduce.errors import ConfigError


def _who(model: nn.Module) -> str:
    if not is_patched(model):
        return "the model (no reducer)"
    reducer = model.token_reducer
    return f"reducer {reducer.name!r} ({reducer.extra_repr()})"


def export_program(model: nn.Module, example: Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """`torch.export.export(model, (example,))`, the batch dimension symbolic unless `dynamic_batch`
    is False. `model` must be in evaluation mode; `example` is a batch of images of the size the
    program will take (any batch size: only its shape is fixed, the batch excepted).

    Raises ConfigError naming the reducer when its forward pass cannot be exported (a reducer
    that knows why says so itself); PyTorch's message follows as the cause.
    """
    if model.training:
        raise ConfigError("export: the model is in training mode, whose passes (dropout, drop path, "
                          "training-only reductions such as DynamicViT's masks) are not what is deployed; "
                          "allowed: a model in evaluation mode (model.eval())")
    if not isinstance(example, Tensor) or example.dim() < 1:
        raise ConfigError(f"export: example={type(example).__name__} is invalid; allowed: a batch of inputs "
                          "as one tensor, batch first")
    dynamic = None
    if dynamic_batch:
        if example.shape[0] == 0:
            raise ConfigError("export: an example of batch 0 is invalid; allowed: a batch of 1 or more")
        if example.shape[0] == 1:  # export would take a dimension of size 1 as fixed at 1
            example = torch.cat([example, example])
        dynamic = ({0: torch.export.Dim("batch", min=1)},)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)
    except ConfigError:
        raise
    except Exception as error:  # torch's own message names a line of its tracer, not the method
        raise ConfigError(f"export: {_who(model)} could not be exported"
                          f"{' with a dynamic batch' if dynamic_batch else ''}: {_gist(error)}") from error


def export_onnx(model: nn.Module | torch.export.ExportedProgram, example: Tensor | None = None,
                path: str | os.PathLike | None = None, dynamic_batch: bool = True, optimize: bool = True):
    """The ONNX program of `model` (a `torch.onnx.ONNXProgram`, written to `path` when given), converted
    by PyTorch's ONNX exporter from `export_program(model, example, dynamic_batch)`, or from a
    program `model` that `export_program` made already (then no `example`). The input is named
    "images", the output "output". `optimize`: the exporter's graph optimisation (constant folding,
    fusions). Needs onnxscript (the `export` extra)."""
    try:
        import onnxscript  # noqa: F401  (the exporter's dependency, checked before any tracing)
    except ImportError as error:
        raise ConfigError("export_onnx: needs onnxscript; allowed: pip install 'tokenreduce[export]'") from error
    if isinstance(model, torch.export.ExportedProgram):
        if example is not None:
            raise ConfigError("export_onnx: an example given with an exported program is invalid (its shapes "
                              "are fixed already); allowed: example=None")
        program, who = model, "the exported program"
    else:
        if example is None:
            raise ConfigError("export_onnx: example=None is invalid for a model; allowed: a batch of inputs")
        program, who = export_program(model, example, dynamic_batch), _who(model)
    try:
        onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=["images"],
                                         output_names=["output"], optimize=optimize)
    except Exception as error:
        raise ConfigError(f"export_onnx: {who} exported to torch.export but not to ONNX: {_gist(error)}") from error
    if path is not None:
        onnx_program.save(path)
    return onnx_program


def _gist(error: BaseException) -> str:
    """The gist of a PyTorch export error: the first two lines of its innermost cause (the outer
    ones are the exporter's general advice)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:400] or type(error).__name__
