"""ExecuTorch programs (``.pte``) lowered to the XNNPACK delegate: fp32, and int8 through the XNNPACK quantizer.

``torch.export`` → ``to_edge_transform_and_lower`` with ``XnnpackPartitioner`` → ``to_executorch`` → one
``model.pte``. XNNPACK picks its kernels for the CPU it runs on when the program loads, so the same file serves x86-64
and Arm64. The program takes what the other forms take: a normalized float batch [B, 3, H, W] (the model card's mean
and std), and returns float logits.

Batch sizes: ExecuTorch plans memory for the largest input a method accepts, so a dynamic batch needs an upper bound
(``CHUNK``). Under torch 2.13, lowering a float convolution guards the batch dimension at 16 (a dynamic range 1-64
comes out as 2-15), so a float program holds one method per range, sharing the weights: ``forward`` for batches of
1 to 15 and ``forward_batch`` for 16 to ``CHUNK``. The int8 graph has no such guard: an int8 program has one
method, ``forward``, for 1 to ``CHUNK``. The runtime reads each method's largest batch from the program, sends a
batch to the smallest method that takes it and splits a larger one into chunks (at 64 images of 32² XNNPACK is
already at full throughput); the tests check batches of 1 to 100 against eager.

int8: the float model is quantized again here with the XNNPACK quantizer (symmetric, per-channel weights) in the
same torchao PT2E flow as ``quantize.py``, calibrated on the same batches: the Inductor int8 program's
quantize/dequantize layout is not the one XNNPACK's int8 kernels are matched against.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signpost.optimize import quiet_libraries
from signpost.optimize.quantize import export_batch_dynamic

log = logging.getLogger(__name__)

CHUNK = 64  # the largest batch one call of the program takes; larger batches are split into chunks of this size
# Each method of the program: (name, smallest batch, largest batch). The runtime reads the largest from the program.
FLOAT_METHODS = (("forward", 1, 15), ("forward_batch", 16, CHUNK))
INT8_METHODS = (("forward", 1, CHUNK),)


class ExecutorchUnavailable(RuntimeError):
    """The executorch package is not installed, or cannot lower this model."""


def write_executorch(
    model: nn.Module,
    image_size: int,
    path: Path,
    *,
    int8: str | None = None,
    calibration: Iterable[torch.Tensor] = (),
) -> dict[str, Any]:
    """Lower the float ``model`` to an XNNPACK ExecuTorch program at ``path``; returns the settings that made it.

    ``int8``: ``"static"`` (activation ranges from the normalized float ``calibration`` batches) or ``"dynamic"``
    (ranges per call; XNNPACK quantizes only Linear layers that way); ``None`` for fp32.
    Raises ``ExecutorchUnavailable`` when executorch is missing and whatever lowering raises when an op cannot be
    lowered; the caller records it as the variant's reason.
    """
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.version import __version__
    except ImportError as exc:
        raise ExecutorchUnavailable(f"executorch is not installed ({exc}): pip install 'signpost[executorch]'") from exc
    model = model.eval()
    methods = FLOAT_METHODS if int8 is None else INT8_METHODS
    settings: dict[str, Any] = {"delegate": "xnnpack", "precision": "fp32", "executorch": __version__,
                                "methods": {name: [low, high] for name, low, high in methods}}
    with warnings.catch_warnings(), quiet_libraries(), torch.no_grad():
        warnings.simplefilter("ignore")  # pytree and export deprecation chatter about internals of executorch
        if int8 is not None:
            model, batches = _quantize(model, image_size, int8, calibration)
            settings |= {"precision": f"int8-{int8}", "quantizer": "xnnpack", "calibration_batches": batches,
                         "flow": "torchao.quantization.pt2e"}
        programs = {}
        for name, low, high in methods:
            example = torch.randn(max(low, 2), 3, image_size, image_size)  # 2: export specializes a batch of 1
            batch = torch.export.Dim(f"batch_{name}", min=low, max=high)
            programs[name] = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        program = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    return settings


def _quantize(
    model: nn.Module, image_size: int, scheme: str, calibration: Iterable[torch.Tensor]
) -> tuple[nn.Module, int]:
    """``model`` quantized for XNNPACK (torchao PT2E, XNNPACK quantizer); returns it and the calibration batches."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if scheme not in ("static", "dynamic"):
        raise ValueError(f"unknown int8 scheme {scheme!r}; choose static or dynamic")
    dynamic = scheme == "dynamic"
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                                is_dynamic=dynamic))
    example = torch.randn(2, 3, image_size, image_size)
    prepared = prepare_pt2e(export_batch_dynamic(model, example).module(), quantizer)
    batches = 0
    if dynamic:
        prepared(example)  # the weight observers still need one pass, as in quantize.py
    else:
        for x in calibration:
            prepared(x)
            batches += 1
        if batches == 0:
            raise ValueError("static int8 needs calibration batches; none were given")
    return convert_pt2e(prepared), batches
