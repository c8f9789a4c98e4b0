"""OpenVINO IR (``model.xml`` + ``model.bin``): fp32, and int8 through NNCF post-training quantization.

``torch.export`` (dynamic batch, as every other export here) → ``openvino.convert_model`` → ``openvino.save_model``.
The exported program is converted rather than the ONNX file: it does not depend on ``optimize.export_onnx``, it is
the same capture AOTInductor and ExecuTorch start from, and the converted graph matched eager to 2e-8 on signnet.
The input is fixed to ``[batch, 3, H, W]`` with only the batch dynamic (``torch.export`` leaves H and W symbolic), so
the CPU plugin plans its kernels for the one image size the model card names.

Weights are saved as fp32 (``compress_to_fp16=False``): bf16 is a run-time choice, the CPU plugin's inference
precision hint (``runtime.py``), not a property of the file.

int8: OpenVINO cannot convert the Inductor int8 program (``quantize.py``): its quantize/dequantize pairs around
convolutions fail to convert (an i8 convolution added to an f32 bias). So the float IR is quantized here with NNCF
(``nncf.quantize``: symmetric int8 weights and activations, ranges from the same normalized calibration batches),
and the variant is held to its own accuracy budget like every other form of it.

Telemetry: OpenVINO's converter and NNCF send usage events to Google Analytics unless the user has opted out
(``openvino_telemetry``; only CI environments are exempt). Signpost makes no network calls beyond loopback, so both
import, convert and quantize here with telemetry declined and its sender disabled
(``runtime.no_openvino_telemetry``; ``import openvino`` alone sends an event).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signpost.optimize import quiet_libraries
from signpost.optimize.quantize import export_batch_dynamic
from signpost.runtime import OV_XML, no_openvino_telemetry


class OpenvinoUnavailable(RuntimeError):
    """The openvino package (or nncf, for int8) is not installed."""


def write_openvino(
    model: nn.Module,
    image_size: int,
    folder: Path,
    *,
    calibration: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Convert the float ``model`` to an OpenVINO IR in ``folder`` (``model.xml``, and ``model.bin`` beside it);
    returns the settings that made it.

    ``calibration``: normalized float batches; given, the IR is quantized to int8 with NNCF on them.
    Raises ``OpenvinoUnavailable`` when openvino (or nncf) is missing, and whatever conversion raises for a model it
    cannot take; the caller records it as the variant's reason and removes any half-written file.
    """
    try:
        with no_openvino_telemetry():
            import openvino as ov
    except ImportError as exc:
        raise OpenvinoUnavailable(f"openvino is not installed ({exc}): pip install 'signpost[openvino]'") from exc
    settings: dict[str, Any] = {"precision": "fp32", "openvino": ov.get_version().split("-")[0],
                                "source": "torch.export", "weights": "fp32"}
    model = model.eval()
    example = torch.randn(2, 3, image_size, image_size)  # 2: export specializes a batch of 1
    with no_openvino_telemetry():
        with warnings.catch_warnings(), quiet_libraries(), torch.no_grad():
            warnings.simplefilter("ignore")  # pytree and export deprecation chatter about torch internals
            converted = ov.convert_model(export_batch_dynamic(model, example))
        converted.reshape({0: ov.PartialShape([-1, 3, image_size, image_size])})
        if calibration is not None:
            converted, batches = _quantize(converted, calibration)
            settings |= {"precision": "int8-static", "quantizer": "nncf", "calibration_batches": batches}
    ov.save_model(converted, str(folder / OV_XML), compress_to_fp16=False)  # writes model.bin beside it
    return settings


def _quantize(model: Any, calibration: Sequence[torch.Tensor]) -> tuple[Any, int]:
    """``model`` (an ``openvino.Model``) quantized to int8 by NNCF on ``calibration``; returns it and the batch
    count."""
    try:
        import nncf
    except ImportError as exc:
        raise OpenvinoUnavailable(f"nncf is not installed ({exc}): pip install 'signpost[openvino]'") from exc
    if not calibration:
        raise ValueError("int8 OpenVINO needs calibration batches; none were given")
    dataset = nncf.Dataset(list(calibration), lambda batch: batch.numpy())
    # NNCF draws progress bars on stdout (rich, not logging): library code prints nothing, so they go nowhere.
    with quiet_libraries(), contextlib.redirect_stdout(io.StringIO()):
        quantized = nncf.quantize(model, dataset, subset_size=len(calibration))  # every batch, each counted once
    return quantized, len(calibration)
