"""int8 post-training quantization through torchao's PT2E flow, lowered through Inductor.

``torch.export`` captures the model with a dynamic batch dimension; the quantizer for this CPU (x86 Inductor on
x86-64, Arm Inductor on arm64) annotates it; ``prepare_pt2e`` inserts observers; calibration batches set the
activation ranges; ``convert_pt2e`` writes int8 weights and quantize/dequantize pairs. The result is exported again
and saved as a ``torch.export`` program: int8 weights on disk, and a graph Inductor fuses into int8 kernels when it
is compiled (``torch.compile`` with freezing, or AOTInductor). ``torch.ao.quantization`` is deprecated and not used.
Registering those fusion passes is the load-time half, and lives in ``runtime.py`` beside the loader.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signpost.runtime import MAX_BATCH, quantizer_name, register_lowering


def _quantizer(dynamic: bool) -> Any:
    if quantizer_name() == "arm_inductor":
        import torchao.quantization.pt2e.quantizer.arm_inductor_quantizer as aq

        return aq.ArmInductorQuantizer().set_global(aq.get_default_arm_inductor_quantization_config(is_dynamic=dynamic))
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xq

    return xq.X86InductorQuantizer().set_global(xq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))


def export_batch_dynamic(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with a dynamic batch dimension (1 to ``MAX_BATCH``)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def quantize_int8(
    model: nn.Module, calibration: Iterable[torch.Tensor], example: torch.Tensor, *, dynamic: bool = False
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Quantize ``model`` to int8: static (activation ranges from ``calibration``) or dynamic (ranges per call).

    Returns the quantized program and the settings that made it. ``model`` is not modified.
    """
    register_lowering()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = model.eval()
    captured = export_batch_dynamic(model, example).module()
    prepared = prepare_pt2e(captured, _quantizer(dynamic))
    batches = 0
    with torch.no_grad():
        if dynamic:
            # Activation scales are computed per call, but the weight observers still need one forward pass, or
            # convert_pt2e falls back to default scales and the model computes garbage.
            prepared(example)
        else:
            for x in calibration:
                prepared(x)
                batches += 1
    converted = _drop_unused_tensors(convert_pt2e(prepared))
    program = export_batch_dynamic(converted, example)
    settings = {"quantizer": quantizer_name(), "scheme": "dynamic" if dynamic else "static",
                "calibration_batches": batches, "flow": "torchao.quantization.pt2e"}
    return program, settings


def _drop_unused_tensors(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Delete the float weights ``convert_pt2e`` leaves behind (its graph reads the folded int8 copies): without
    this the saved program carries both, and is larger than the float model."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in [*module.named_parameters(), *module.named_buffers()] if n not in used]:
        owner, _, attr = name.rpartition(".")
        delattr(module.get_submodule(owner) if owner else module, attr)
    return module


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """Save ``program`` compactly: no example inputs, no per-node debug metadata, a deflated archive.

    ``torch.export.save`` stores everything uncompressed with each node's stack trace; ``torch.export.load`` reads
    the deflated archive as well. For signnet the int8 program is then about a quarter of the fp32 safetensors.
    """
    for node in program.graph.nodes:
        for key in ("stack_trace", "from_node", "nn_module_stack", "source_fn_stack", "torch_fn"):
            node.meta.pop(key, None)
    program._example_inputs = None
    raw = path.with_name(f"{path.stem}.uncompressed.pt2")  # torch.export.save wants the .pt2 suffix
    try:
        torch.export.save(program, str(raw))
        with zipfile.ZipFile(raw) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
            for info in src.infolist():
                dst.writestr(info.filename, src.read(info.filename))
    finally:
        raw.unlink(missing_ok=True)
