"""Model optimization: int8 quantization, structured pruning, compiled and exported forms."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from signpost.artifacts import is_complete
from signpost.contracts import VariantRow, read_variants

# Libraries used here that log their internals (every ONNX optimizer pass) or warn about things that do not apply
# (torchvision ops the ONNX exporter would register, torchao's GPU-only kernels). torch resets its own loggers'
# levels when it is imported, so the CLI cannot set these once up front; with debug logging on, nothing is hidden.
_NOISY = {"torch.onnx": logging.ERROR, "torch.utils._pytree": logging.ERROR, "onnxscript": logging.WARNING,
          "onnx_ir": logging.WARNING, "torchao": logging.ERROR, "nncf": logging.ERROR}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Raise the noisy libraries' log levels inside the block (not when the root logger is at DEBUG)."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = {name: logging.getLogger(name) for name in _NOISY}
    previous = {name: logger.level for name, logger in loggers.items()}
    for name, logger in loggers.items():
        logger.setLevel(max(_NOISY[name], logger.level))
    try:
        yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(previous[name])


def variant_folders(optimize_dir: Path, table: list[VariantRow] | None = None) -> Iterator[tuple[VariantRow, Path]]:
    """(variant row, folder) for every variant of an optimize artifact that was made (ok or rejected).

    ``table``: the artifact's variants table when the caller has read (and checked) it already; else it is read
    here, validated but not checked against the manifest.
    """
    for row in read_variants(optimize_dir, verify=False) if table is None else table:
        if row.path and is_complete(Path(optimize_dir) / row.path):
            yield row, Path(optimize_dir) / row.path
