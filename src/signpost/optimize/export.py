"""Compiled and exported forms of a model, each with a dynamic batch dimension.

- AOTInductor: ``torch.export`` → ``aoti_compile_and_package`` → one ``.pt2`` package of native code and weights,
  loadable with ``torch._inductor.aoti_load_package`` in a process that has neither the model code nor a compiler;
  with ``bf16`` the model is exported under bf16 autocast (float in, float out, bf16 inside).
- ONNX: the ``torch.export``-based exporter (``dynamo=True``), opset 20, batch dimension named ``batch``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from signpost.optimize import quiet_libraries
from signpost.optimize.quantize import export_batch_dynamic

log = logging.getLogger(__name__)
ONNX_OPSET = 20


def write_aoti(
    model: nn.Module | torch.export.ExportedProgram, example: torch.Tensor, path: Path, *, bf16: bool = False
) -> None:
    """Compile ``model`` (a module, or an already exported program such as the int8 one) ahead of time to ``path``;
    ``bf16`` (modules only): under bf16 autocast, as the ``compile`` runtime runs it for bf16 math."""
    import torch._inductor.config as inductor_config

    if isinstance(model, torch.export.ExportedProgram):
        if bf16:
            raise ValueError("a bf16 AOTInductor package is made from a module, not an exported program")
        program = model
    else:
        program = export_batch_dynamic(_Bf16Autocast(model) if bf16 else model, example)
    with inductor_config.patch(freezing=True):
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


class _Bf16Autocast(nn.Module):
    """``model`` under CPU bf16 autocast, returning float logits: export records the casts into the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Export ``model`` to ONNX at ``path`` with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), torch.no_grad(), quiet_libraries():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter about options it sets itself
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["images"],
            output_names=["logits"], dynamic_shapes=({0: batch},), optimize=True, verbose=False,
        )
    program.save(str(path))
