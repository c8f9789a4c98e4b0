"""Runtimes: one way to load any model form Signpost writes and call it on a batch, without the training code.

A model artifact can hold several forms of the same model (``FORMS``): safetensors weights with a model card (any
float variant), a ``torch.export`` program (the int8 variant, whose quantized graph is not a plain module), an
AOTInductor package (native code compiled ahead of time; float variants have a second one compiled under bf16
autocast) and an ONNX file. A runtime loads one form:

- ``eager``: the module as is, NCHW (weights, or the exported program's module): the baseline;
- ``compile``: ``torch.compile`` with Inductor freezing (weights folded and prepacked for oneDNN), channels_last; with
  ``bf16=True`` under bf16 autocast; the batch dimension is dynamic, so a new batch size does not recompile. Loaded
  with ``images=True`` (as the server loads it) the compiled graph takes uint8 images and normalizes them itself;
- ``aoti``: the AOTInductor package, compiled at optimize time with a dynamic batch dimension; with ``bf16=True``
  the bf16 package when the artifact has one (as fast as ``compile`` + bf16, with no compiler needed to load it);
- ``onnxruntime``: the ONNX file in ONNX Runtime, all graph optimizations on;
- ``executorch``: the ExecuTorch program (``.pte``, XNNPACK delegate; fp32, or int8 for int8 variants);
- ``openvino``: the OpenVINO IR (``model.xml`` + ``model.bin``; fp32, or NNCF int8 for int8 variants) on the CPU
  plugin, with the LATENCY hint for batch 1 and THROUGHPUT for batches, f32 or (``bf16=True``) bf16 precision.

Every file is checked against the artifact's manifest before it is read, and nothing is unpickled: weights come
from safetensors, exported programs from ``torch.export.load`` (JSON graph and raw tensor data), ONNX from protobuf.
The AOTInductor package holds native code: it is loaded only after its hash matches the manifest.

Conversion happens here, at load time, as gpt-fast converts at load: ``optimize/quantize.py`` makes the int8 program
offline, and ``register_lowering`` gives Inductor the int8 fusion passes it needs to compile that program.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import platform
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signpost.artifacts import ArtifactError, verify_artifact
from signpost.config import MAX_BATCH as MAX_BATCH  # the largest batch the exported forms accept
from signpost.models.artifact import CARD, WEIGHTS, ModelCard, load_model

PROGRAM = "program.pt2"  # torch.export program (ExportedProgram), used by the int8 variant
AOTI = "model.aoti.pt2"  # AOTInductor package
AOTI_BF16 = "model.aoti-bf16.pt2"  # AOTInductor package compiled under bf16 autocast (float variants)
ONNX = "model.onnx"
PTE = "model.pte"  # ExecuTorch program, XNNPACK delegate
OV_XML, OV_BIN = "model.xml", "model.bin"  # OpenVINO IR: the graph, and its weights (always checked together)
FORMS = {"weights": WEIGHTS, "program": PROGRAM, "aoti": AOTI, "aoti_bf16": AOTI_BF16, "onnx": ONNX,
         "executorch": PTE, "openvino": OV_XML}
RUNTIMES = ("eager", "compile", "aoti", "onnxruntime", "executorch", "openvino")
# Which form each runtime reads, in order of preference.
_RUNTIME_FORMS = {"eager": ("weights", "program"), "compile": ("weights", "program"), "aoti": ("aoti",),
                  "onnxruntime": ("onnx",), "executorch": ("executorch",), "openvino": ("openvino",)}
WARMUP_BATCHES = (1, 2, 16)  # one batch of each shape regime torch.compile makes a graph for


class RuntimeUnavailable(RuntimeError):
    """This runtime cannot run this model artifact (the form is missing, or a library is not installed)."""


@dataclass
class Predictor:
    """A loaded model: call it with a normalized float batch [B, 3, H, W] to get logits [B, classes], or give
    ``from_images`` the uint8 images [B, H, W, 3] decoding makes."""

    runtime: str
    form: str
    card: ModelCard
    forward: Callable[[torch.Tensor], torch.Tensor]
    channels_last: bool = False  # the layout it runs in: a caller that builds batches from HWC images (as decoding
    # does) gets it for free by stacking them [B, H, W, C] and permuting, instead of paying a copy on every call
    images: Callable[[torch.Tensor], torch.Tensor] | None = None  # uint8 [B, H, W, 3] -> logits, normalizing inside
    # the compiled graph (compile runtime loaded with images=True)
    settings: dict[str, Any] = field(default_factory=dict)  # what the runtime was set to (ONNX Runtime, OpenVINO and
    # ExecuTorch report their settings), for a measurement to write beside its figures
    _shift: torch.Tensor = field(init=False, repr=False)  # the card's normalization, made once (not per call)
    _scale: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._shift, self._scale = _normalization(self.card)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def from_images(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 images ``[B, H, W, 3]``, normalized with the model card's mean and std."""
        if self.images is not None:
            return self.images(images)
        x = images.permute(0, 3, 1, 2)  # a view: already the memory layout of a channels-last predictor
        if not self.channels_last:
            x = x.contiguous()
        return self.forward((x.float() - self._shift) * self._scale)


def available_runtimes(folder: Path) -> list[str]:
    """The runtimes that can load the model artifact in ``folder``, judging by the files it holds."""
    return [rt for rt in RUNTIMES if any((Path(folder) / FORMS[f]).is_file() for f in _RUNTIME_FORMS[rt])]


def load_predictor(
    folder: Path,
    runtime: str = "eager",
    *,
    bf16: bool = False,
    threads: int | None = None,
    warmup: tuple[int, ...] = WARMUP_BATCHES,
    images: bool = False,
) -> Predictor:
    """Load the model artifact in ``folder`` for ``runtime``. Files are checked against the manifest first.

    ``warmup``: batch sizes the ``compile`` runtime compiles for before returning; the default covers every shape
    regime, so no later call compiles. A caller that will only ever use some batch sizes can name just those. The
    ``openvino`` runtime reads them too: a batch above 1 among them gets a THROUGHPUT-compiled model beside the
    LATENCY one.
    ``images``: the caller will call ``from_images`` (uint8 images, as a server has them): the ``compile`` runtime
    then compiles the normalization into its graph, where it fuses with the first kernel (at batch 64 normalizing
    outside cost a third of traffic_sign_net's compiled forward), and warms up that graph instead of the float one.

    Raises ``RuntimeUnavailable`` when the artifact has no form this runtime reads, ``ArtifactError`` when a file
    does not match the manifest, ``ValueError`` for an unknown runtime.
    """
    folder = Path(folder)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of: {', '.join(RUNTIMES)}")
    form = next((f for f in _RUNTIME_FORMS[runtime] if (folder / FORMS[f]).is_file()), None)
    if runtime == "aoti" and bf16 and (folder / AOTI_BF16).is_file():
        form = "aoti_bf16"
    if form is None:
        wanted = " or ".join(FORMS[f] for f in _RUNTIME_FORMS[runtime])
        raise RuntimeUnavailable(f"{folder} has no {wanted}: the {runtime} runtime cannot load it")
    manifest = verify_artifact(folder, [CARD, FORMS[form]], signed=True)
    card = ModelCard.model_validate_json((folder / CARD).read_text(encoding="utf-8"))
    if threads:
        torch.set_num_threads(threads)
    if runtime == "executorch":
        forward = executorch_forward(_checked_bytes(folder, PTE, manifest), folder / PTE, threads)
        return Predictor(runtime, form, card, forward, settings=dict(EXECUTORCH_SETTINGS))
    if runtime == "openvino":
        xml, weights = (_checked_bytes(folder, name, manifest) for name in (OV_XML, OV_BIN))
        try:
            forward, settings = openvino_forward(xml, weights, bf16=bf16, threads=threads, batches=warmup)
        except ArtifactError as exc:
            raise ArtifactError(f"{folder}: {exc}") from exc
        return Predictor(runtime, form, card, forward, settings=settings)
    if runtime == "onnxruntime":
        return Predictor(runtime, form, card, _onnxruntime(folder / ONNX, threads), settings=dict(ORT_SETTINGS))
    if runtime == "aoti":
        return Predictor(runtime, form, card, _aoti(folder / FORMS[form]))
    if form == "program":
        register_lowering()  # the int8 fusion passes Inductor needs to compile a quantized program
    module = load_model(folder, verify=False)[0] if form == "weights" else load_program(folder / PROGRAM)
    if runtime == "eager":  # the module as a user would call it (NCHW, no compilation): the baseline
        return Predictor(runtime, form, card, _no_grad(module))
    forward = _compiled(module, bf16=bf16, image_size=card.image_size, warmup=() if images else warmup)
    predictor = Predictor(runtime, form, card, forward, channels_last=True)
    if images:
        predictor.images = _compiled(_FromImages(module, predictor._shift, predictor._scale), bf16=bf16,
                                     image_size=card.image_size, warmup=warmup, images=True)
    return predictor


def quantizer_name() -> str:
    """The PT2E quantizer for this machine's CPU architecture."""
    return "arm_inductor" if platform.machine().lower() in ("aarch64", "arm64") else "x86_inductor"


def register_lowering() -> str:
    """Import the quantizer module for this CPU; importing it registers its Inductor int8 fusion passes.

    A fresh process that compiles a saved int8 program calls this first, or Inductor runs the quantize/dequantize
    pairs as separate ops. Returns the quantizer's name.
    """
    name = quantizer_name()
    with _quiet_torchao():
        if name == "arm_inductor":
            import torchao.quantization.pt2e.quantizer.arm_inductor_quantizer
        else:
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401
    return name


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    """torchao's import warns about GPU-only kernels a CPU build cannot load: its logger is at ERROR inside the block
    (unless the root logger is at DEBUG)."""
    logger = logging.getLogger("torchao")
    previous = logger.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logger.setLevel(max(logging.ERROR, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


def _normalization(card: ModelCard) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> normalized float as one multiply-add: ``(x - mean * 255) * scale``, broadcast over [B, 3, H, W]."""
    shift = torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
    return shift, scale


class _FromImages(nn.Module):
    """The model behind its input normalization: uint8 images [B, H, W, 3] in, logits out."""

    def __init__(self, model: nn.Module, shift: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # NCHW view of channels-last memory
        return self.model((x - self.shift) * self.scale)


def load_program(path: Path) -> nn.Module:
    """The module of a saved ``torch.export`` program (the int8 variant's quantized graph), unpickling nothing.

    ``torch.export.load`` reads more than Signpost writes, and several of those shapes unpickle: tensors marked
    ``use_pickle``, legacy ``data/weights/<model>.pt`` and ``data/constants/<model>.pt`` files, custom and opaque
    objects, sample inputs it retries with a full unpickle when a weights-only load fails, the pre-2.8 zip layout, and
    AOTInductor entries (native code). So the archive is checked against the entries a Signpost export writes
    (``PROGRAM_ENTRIES``), copied entry by entry into a fresh archive in memory (torch then reads exactly what was
    checked, however the original zip was put together), and loaded while ``torch.load`` can only run weights-only.
    """
    archive = _checked_program_archive(path)
    try:
        with _weights_only_loads():
            return torch.export.load(archive).module()
    except _WouldUnpickle as exc:
        raise ArtifactError(f"{path}: {exc}; refusing to unpickle it") from None
    except Exception as exc:  # a corrupt archive can fail in many ways inside torch.export
        raise ArtifactError(f"{path}: not a loadable torch.export program: {exc}") from exc


# Every entry a Signpost export writes (``optimize.quantize.save_program``), below the archive's one top folder.
# Anything else (legacy weight, constant or sample-input pickles, custom objects, AOTInductor code, extra files) is
# refused by name before torch sees the archive.
PROGRAM_ENTRIES = re.compile(
    r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)"
)
_PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": ("data/weights/", r"weight_\d+"),
                    "data/constants/model_constants_config.json": ("data/constants/", r"tensor_\d+")}
_MAX_PROGRAM_BYTES = 1 << 30  # 1 GiB uncompressed: far above any image classifier; a zip bomb stops here


class _WouldUnpickle(Exception):
    """Raised inside ``torch.export.load`` when it tries to unpickle (not a RuntimeError, which torch catches)."""


def _checked_program_archive(path: Path) -> io.BytesIO:
    """The archive at ``path`` rebuilt from its allowed entries only, after checking that none would unpickle."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            tops = {name.split("/", 1)[0] for name in names}
            if len(tops) != 1 or any("/" not in name for name in names):
                raise ArtifactError(f"{path}: not a torch.export program archive (entries must share one folder)")
            if len(set(names)) != len(names):
                raise ArtifactError(f"{path}: the archive names an entry twice")
            if sum(info.file_size for info in infos) > _MAX_PROGRAM_BYTES:
                raise ArtifactError(f"{path}: the archive unpacks to more than {_MAX_PROGRAM_BYTES >> 20} MiB")
            entries = {name.split("/", 1)[1]: archive.read(name) for name in names}
    except ArtifactError:
        raise
    except Exception as exc:  # not a zip, a corrupt entry, a bad CRC
        raise ArtifactError(f"{path}: not a plain torch.export program archive: {exc}") from exc
    unexpected = sorted(name for name in entries if not PROGRAM_ENTRIES.fullmatch(name))
    if unexpected:
        raise ArtifactError(f"{path}: entries a Signpost export never writes: {', '.join(unexpected[:5])}; refusing "
                            "to load it (they are read by pickle or as native code)")
    if entries.get("data/sample_inputs/model.pt"):
        raise ArtifactError(f"{path}: the archive carries sample inputs (a pickle); Signpost exports have none")
    for config_name, (folder, file_pattern) in _PAYLOAD_CONFIGS.items():
        if config_name not in entries:
            raise ArtifactError(f"{path}: the archive has no {config_name}")
        try:
            payloads = json.loads(entries[config_name])["config"]
            for fqn, meta in payloads.items():
                if meta.get("use_pickle") is not False:
                    raise ArtifactError(f"{path}: tensor {fqn!r} is pickled; refusing to unpickle it")
                if not re.fullmatch(file_pattern, meta["path_name"]) or folder + meta["path_name"] not in entries:
                    raise ArtifactError(f"{path}: tensor {fqn!r} names {meta['path_name']!r}, not a raw tensor "
                                        f"entry of the archive")
        except ArtifactError:
            raise
        except Exception as exc:  # not JSON, or not the shape torch writes
            raise ArtifactError(f"{path}: {config_name} is not a payload table: {exc}") from exc
    canonical = io.BytesIO()
    with zipfile.ZipFile(canonical, "w", zipfile.ZIP_STORED) as out:
        for name, data in entries.items():
            out.writestr(f"program/{name}", data)
    canonical.seek(0)
    return canonical


_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """While loading a program: ``torch.load`` runs weights-only, and a request to unpickle raises instead.

    The archive check already refuses every entry torch would unpickle; this makes a gap in that check (a new torch
    reading a new entry) an error rather than code execution.
    """
    original = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("weights_only") is False:
            raise _WouldUnpickle("torch.export asked to unpickle an entry of the archive")
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with _LOAD_LOCK:
        torch.load = weights_only_load
        try:
            yield
        finally:
            torch.load = original


def _no_grad(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module(x)

    return forward


def _compiled(
    module: nn.Module, *, bf16: bool, image_size: int, warmup: tuple[int, ...], images: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` compiled for float batches [B, 3, H, W], or (``images``) for uint8 images [B, H, W, 3]."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # fold weights into constants and prepack them for oneDNN
    compiled = torch.compile(module)

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        # Batch sizes vary between calls: dimension 0 is dynamic, so one graph serves every size of a regime.
        x = x.contiguous() if images else x.contiguous(memory_format=torch.channels_last)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return compiled(x).float()

    # Inductor splits the batch dimension into regimes with a graph each: 1 (specialised), 2-15 and 16+ (its
    # convolution layout heuristics guard on them). Compiling all three now means no call ever compiles later.
    for batch in warmup:
        shape = (batch, image_size, image_size, 3) if images else (batch, 3, image_size, image_size)
        forward(torch.zeros(shape, dtype=torch.uint8 if images else torch.float32))
    return forward


def _aoti(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        package = torch._inductor.aoti_load_package(str(path))
    except Exception as exc:
        raise ArtifactError(f"{path}: not a loadable AOTInductor package for this machine: {exc}") from exc

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return package(x.contiguous())

    return forward


# ONNX Runtime's documented best CPU settings, as the session below is made (and reported in Predictor.settings).
# Spinning threads steal the cores between calls from everything else in the process.
ORT_SETTINGS: dict[str, Any] = {"provider": "CPUExecutionProvider", "graph_optimization_level": "ORT_ENABLE_ALL",
                                "inter_op_num_threads": 1, "session.intra_op.allow_spinning": "0",
                                "session.inter_op.allow_spinning": "0"}
EXECUTORCH_SETTINGS: dict[str, Any] = {"delegate": "XNNPACK"}  # every program is lowered to it (executorch_export)


def _onnxruntime(path: Path, threads: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeUnavailable(f"onnxruntime is not installed ({exc}): pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_SETTINGS["graph_optimization_level"])
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = ORT_SETTINGS["inter_op_num_threads"]
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        options.add_session_config_entry(key, ORT_SETTINGS[key])
    try:
        session = ort.InferenceSession(str(path), options, providers=[ORT_SETTINGS["provider"]])
    except Exception as exc:
        raise ArtifactError(f"{path}: not a loadable ONNX model: {exc}") from exc
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.contiguous().numpy()})[0])

    return forward


def executorch_forward(data: bytes, path: Path, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ExecuTorch program ``data`` (the bytes of ``path``, already checked against the manifest: the runtime
    parses exactly what was checked; a flatbuffer, nothing unpickled).

    ``threads``: the size of ExecuTorch's own thread pool, which XNNPACK runs on; it is one pool per process, so
    the last load sets it. The program has one method per batch range (``optimize/executorch_export.py``): a batch
    goes to the smallest method that takes it, and a batch above the largest is split into chunks of that size.
    """
    try:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch is not installed ({exc}): pip install 'signpost[executorch]'") from exc
    if threads:
        portable_lib._unsafe_reset_threadpool(threads)  # "unsafe": only while no method of the process is running
    try:
        program = Runtime.get().load_program(data)
        # (largest batch, method): ExecuTorch planned each method's memory for its largest input
        methods = sorted(((program.metadata(name).input_tensor_meta(0).sizes()[0], program.load_method(name))
                          for name in program.method_names), key=lambda pair: pair[0])
        # One call of each method at its largest batch first. With executorch 1.5.1, an int8 method first called
        # at 12 images and then at 15 returned wrong logits (XNNPACK kept buffers sized by the first call); after
        # a first call at the largest batch every size was right (the tests call 1 to 100 images in mixed order).
        for _, method in methods:
            with torch.inference_mode():
                method.execute([torch.zeros(tuple(method.metadata.input_tensor_meta(0).sizes()))])
    except Exception as exc:
        raise ArtifactError(f"{path}: not a loadable ExecuTorch program for this machine: {exc}") from exc
    largest = methods[-1][0]

    def run(x: torch.Tensor, _program: Any = program) -> torch.Tensor:  # the methods live only as long as it does
        method = next(m for limit, m in methods if x.shape[0] <= limit)
        return method.execute([x])[0]

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        if x.shape[0] <= largest:
            return run(x)
        return torch.cat([run(chunk.contiguous()) for chunk in x.split(largest)])

    return forward


def _checked_bytes(folder: Path, name: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of ``folder/name``, read once and checked against the manifest's hash: a runtime handed these bytes
    parses exactly what was checked, whatever happens to the file afterwards."""
    if name not in manifest["files"]:
        raise ArtifactError(f"{folder}: {name} is not listed in the manifest")
    try:
        data = (folder / name).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{folder}: {name} is listed in the manifest but cannot be read: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]:
        raise ArtifactError(f"{folder}: {name} does not match its manifest; the artifact was modified or corrupted")
    return data


@contextlib.contextmanager
def no_openvino_telemetry() -> Iterator[None]:
    """Inside the block, OpenVINO's and NNCF's telemetry (``openvino_telemetry``) finds consent declined, so it
    writes no client id under ``~/intel``, and its sender drops every message, whatever an earlier user of the
    process set. Without this, ``import openvino`` and every conversion send usage events to Google Analytics
    unless the user opted out (only CI environments are exempt); Signpost makes no network calls beyond loopback."""
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
        from openvino_telemetry.utils.sender import TelemetrySender
    except ImportError:  # not installed: OpenVINO and NNCF fall back to stubs that send nothing
        yield
        return
    check, send = OptInChecker.check, TelemetrySender.send
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED  # type: ignore[method-assign]
    TelemetrySender.send = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        OptInChecker.check, TelemetrySender.send = check, send  # type: ignore[method-assign]


def openvino_forward(
    xml: bytes, weights: bytes, *, bf16: bool = False, threads: int | None = None, batches: tuple[int, ...] = (1,)
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """An OpenVINO IR (its ``model.xml`` and ``model.bin`` bytes, already checked) compiled for the CPU plugin, and
    the settings it was compiled with.

    OpenVINO's documented best settings for each job: the LATENCY hint (one stream, every thread on one request) for
    batch 1 and any batch too small to share out, and, when ``batches`` names a batch above 1, a second model
    compiled under THROUGHPUT (several streams), whose requests each run a slice of a large batch at the same time.
    ``bf16``: the bf16 inference precision hint where the plugin has bf16 kernels for this CPU (AMX, AVX-512 BF16,
    Arm BF16), else f32; without it f32, set explicitly because the plugin defaults to bf16 on such CPUs and the
    other runtimes compute in f32 there. ``threads``: INFERENCE_NUM_THREADS, shared by the streams.
    """
    try:
        with no_openvino_telemetry():  # importing openvino sends a usage event otherwise
            import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailable(f"openvino is not installed ({exc}): pip install 'signpost[openvino]'") from exc
    import numpy as np

    core = ov.Core()
    has_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precision = "bf16" if bf16 and has_bf16 else "f32"
    base: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
    if threads:
        base["INFERENCE_NUM_THREADS"] = threads
    try:
        model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        latency = core.compile_model(model, "CPU", base | {"PERFORMANCE_HINT": "LATENCY"})
        throughput = (core.compile_model(model, "CPU", base | {"PERFORMANCE_HINT": "THROUGHPUT"})
                      if any(b > 1 for b in batches) else None)
    except Exception as exc:  # a corrupt or foreign IR fails in many ways inside the frontend or the plugin
        raise ArtifactError(f"{OV_XML} + {OV_BIN}: not a loadable OpenVINO IR for this machine: {exc}") from exc
    request = latency.create_infer_request()
    classes = latency.output(0).get_partial_shape()[1].get_length()
    streams = int(throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")) if throughput is not None else 1
    queue = ov.AsyncInferQueue(throughput, streams) if throughput is not None else None
    lock = threading.Lock()  # a request runs one call at a time; a server may call from several threads
    settings = {"device": "CPU", "inference_precision": precision, "cpu_has_bf16": has_bf16,
                "threads": threads or int(latency.get_property("INFERENCE_NUM_THREADS")),
                "batch_1": "LATENCY", "batches": "THROUGHPUT" if throughput is not None else "LATENCY",
                "throughput_requests": streams, "openvino": ov.get_version().split("-")[0]}

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float().numpy()
        with lock:
            if queue is None or x.shape[0] < 2 * streams:  # too small to share out: one request, every thread
                return torch.from_numpy(request.infer({0: x}, share_outputs=False)[0].copy())
            # One slice per request, run at once; each writes its own rows of the answer.
            out = np.empty((x.shape[0], classes), np.float32)
            bounds = np.linspace(0, x.shape[0], streams + 1).astype(int).tolist()

            def done(job: Any, rows: tuple[int, int]) -> None:
                out[rows[0]:rows[1]] = job.get_output_tensor(0).data

            queue.set_callback(done)
            for low, high in itertools.pairwise(bounds):
                queue.start_async({0: x[low:high]}, (low, high))
            queue.wait_all()
            return torch.from_numpy(out)

    return forward, settings


@contextlib.contextmanager
def math_mode(mode: str) -> Iterator[dict[str, Any]]:
    """Apply a CPU math setting to this process: ``default``, ``bf16`` or ``no-onednn``; yields what was set.

    ``bf16`` sets ``DNNL_DEFAULT_FPMATH_MODE=BF16`` (oneDNN may compute fp32 convolutions and matmuls in bf16); it
    must be in the environment before oneDNN initialises, so measurements set it when starting their subprocess and
    this only records it. ``no-onednn`` turns ``torch.backends.mkldnn`` off (PyTorch's own kernels instead).
    """
    if mode not in ("default", "bf16", "no-onednn"):
        raise ValueError(f"unknown math mode {mode!r}; choose default, bf16 or no-onednn")
    if mode == "no-onednn":
        with torch.backends.mkldnn.flags(enabled=False):
            yield {"mkldnn": False}
        return
    yield {"mkldnn": torch.backends.mkldnn.is_available(), "DNNL_DEFAULT_FPMATH_MODE":
           os.environ.get("DNNL_DEFAULT_FPMATH_MODE", "")}
