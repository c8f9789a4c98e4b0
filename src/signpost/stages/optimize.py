"""optimize: a trained model artifact → optimized variants, each an artifact with its measured accuracy.

Read top to bottom: check the parent model and the prepared data, reuse the result when one exists for these
inputs, otherwise make each variant the config asks for, score it on the validation and test splits, hold it to the
accuracy budget against its parent, and write everything atomically:

    optimize/<name>-<key>/
        manifest.json           every variant's method, settings, accuracy, size and verdict
        variants.json           the same table, for the bench stage
        fp32/                   the parent as is, plus its AOTInductor packages (fp32, bf16), ONNX file,
                                ExecuTorch program (model.pte, XNNPACK) and OpenVINO IR (model.xml + model.bin)
        int8/                   static int8 (torchao PT2E): program.pt2 (+ AOTInductor package, and an XNNPACK
                                int8 model.pte quantized for XNNPACK from the same calibration; an NNCF int8
                                OpenVINO IR from the same calibration, kept only within the budget)
        dynamic-int8/           dynamic int8 on the Linear layers, when the model has any worth it
        pruned/                 channels removed, fine-tuned (+ exports)
        pruned-int8/            the pruned model, quantized to static int8
        student/                a narrower signnet distilled from the parent (+ exports)
        student-alone/          the same student trained on labels only: the distillation's control

Each variant folder is an artifact of its own (manifest with file hashes, model card): the runtime module loads it in
a fresh process without the training code. Fine-tuning and student training are ordinary training runs (the training
engine's recipe, checkpoints and resume) whose own artifacts live in ``optimize/training/``, so a re-run reuses them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    hash_json,
    is_complete,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from signpost.config import SignpostConfig, config_to_dict
from signpost.contracts import VARIANTS_FILE, VariantRow, read_variants, variants_json
from signpost.data.cache import CachedSplit, load_split
from signpost.data.loader import BatchLoader
from signpost.models.artifact import CARD, WEIGHTS, ModelCard, load_model, save_model
from signpost.optimize.executorch_export import write_executorch
from signpost.optimize.export import write_aoti, write_onnx
from signpost.optimize.openvino_export import write_openvino
from signpost.optimize.prune import count_parameters, prune_model
from signpost.optimize.quantize import quantize_int8, save_program
from signpost.runtime import AOTI, AOTI_BF16, ONNX, OV_BIN, OV_XML, PROGRAM, PTE, executorch_forward, openvino_forward
from signpost.tracking import RunFactory, log_stage
from signpost.training import Derived, train_derived

log = logging.getLogger(__name__)

STAGE = "optimize"
_CODE = (__name__, "signpost.optimize", "signpost.runtime", "signpost.training", "signpost.models",
         "signpost.data.loader", "signpost.contracts")
TRAINING = f"{STAGE}/training"  # where fine-tuning and student runs keep their own artifacts and checkpoints
_TOLERANCE = 1e-9
_EVAL_BATCH = 256


@dataclass
class Variant:
    """One optimized form of the parent model and what it measured."""

    name: str
    method: str
    settings: dict[str, Any]
    status: str = "ok"  # ok | rejected (over the accuracy budget) | failed (with the reason)
    reason: str = ""
    path: str = ""  # folder, relative to the optimize artifact
    forms: list[str] = field(default_factory=list)
    val_acc: float | None = None
    test_acc: float | None = None
    size_bytes: int | None = None  # the file that holds the weights (safetensors, or the int8 program)
    parameters: int | None = None
    mflops: float | None = None  # per image, multiply-adds counted as 2
    seconds: float = 0.0
    role: str = "candidate"  # candidate | control (the student trained alone: a comparison, never shipped)


@dataclass
class OptimizeResult:
    """Where the variants are, whether an existing result was reused, and the variants' table."""

    path: Path
    reused: bool
    variants: list[VariantRow]
    manifest: dict[str, Any]


def tracking_summary(config: SignpostConfig, result: OptimizeResult) -> dict[str, Any]:
    """What a tracking run of this optimize result holds: the settings, each variant's accuracy and size, the
    variants table (``signpost.tracking.log_stage`` keywords)."""
    metrics = {}
    for v in result.variants:
        for key in ("val_acc", "test_acc", "size_bytes", "mflops"):
            if isinstance(value := getattr(v, key), int | float):
                metrics[f"{v.name}/{key}"] = float(value)
    statuses = {v.name: v.status for v in result.variants}
    return {"params": {"optimize": config_to_dict(config.optimize), "artifact": result.path.name},
            "metrics": metrics, "files": [result.path / VARIANTS_FILE, result.path / "manifest.json"],
            "tags": {f"signpost.variant.{name}": status for name, status in statuses.items()}}


def optimize(
    config: SignpostConfig,
    *,
    model_dir: Path,
    data_dir: Path,
    progress: bool = True,
    tracking: RunFactory | None = None,
) -> OptimizeResult:
    """Make the variants ``config.optimize`` asks for from the model in ``model_dir``; reuse them when inputs match.

    ``tracking`` makes the stage's tracking run (``signpost.tracking.run_factory``), opened only when the variants
    are made, not reused: it gets ``tracking_summary``.

    Raises ``ArtifactError`` for a model or data folder that does not match its manifest.
    """
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    parent, card = load_model(model_dir)
    parent_key = read_manifest(model_dir, signed=True)["key"]
    data_manifest = verify_artifact(data_dir, ["train.safetensors", "val.safetensors", "test.safetensors"])
    opt = config.optimize
    key = hash_json({
        "model": parent_key,
        "data": data_manifest["key"],
        "optimize": config_to_dict(opt),
        "train": config_to_dict(config.train),  # the recipe that fine-tunes and trains students
        "seed": config.seed,
        "code": code_version(*_CODE),
    })
    path = artifact_path(config.workdir, STAGE, config.name, key)
    if is_complete(path):
        log.info("%s was optimized with these settings already: reusing %s", model_dir, path)
        table = read_variants(path)  # checked against the manifest, as written
        return OptimizeResult(path, True, table, read_manifest(path))

    val, test = load_split(data_dir / "val.safetensors"), load_split(data_dir / "test.safetensors")
    maker = _VariantMaker(config, card, parent_key, model_dir, data_dir, val, test, progress=progress)
    started = time.perf_counter()
    with atomic_dir(path) as tmp:
        variants = [maker.float_variant(tmp, "fp32", "fp32", parent, {}, card)]
        if opt.int8:
            variants.append(maker.int8_variant(tmp, "int8", parent, dynamic=False))
        if opt.dynamic_int8:
            variants.append(maker.dynamic_int8_variant(tmp, parent))
        if opt.prune.enabled:
            variants.append(maker.pruned_variant(tmp, parent))
            if opt.int8 and variants[-1].status == "ok":  # pruning and int8 compound: fewer channels, cheaper ones
                pruned, pruned_card = load_model(tmp / "pruned")
                variants.append(maker.int8_variant(tmp, "pruned-int8", pruned, dynamic=False, card=pruned_card,
                                                   source="pruned"))
        if opt.distill.enabled:
            variants += maker.student_variants(tmp, parent)
        _apply_budget(variants, variants[0], opt.accuracy_budget)
        table = [VariantRow.model_validate(asdict(v)) for v in variants]
        (tmp / VARIANTS_FILE).write_text(variants_json(table), encoding="utf-8")
        manifest = write_manifest(
            tmp,
            stage=STAGE,
            key=key,
            experiment=config.name,
            inputs={"model": model_dir.name, "model_key": parent_key, "data": data_dir.name,
                    "data_key": data_manifest["key"]},
            config=config_to_dict(opt),
            code=code_version(*_CODE),
            metrics={f"{v.name}.test_acc": v.test_acc for v in variants if v.test_acc is not None},
            extra={"variants": [row.model_dump(mode="json") for row in table],
                   "seconds": time.perf_counter() - started},
        )
    for v in variants:
        status = "control" if v.role == "control" else v.status
        log.info("%-14s %-8s test %s  size %s  %s", v.name, status, _pct(v.test_acc), _kb(v.size_bytes), v.reason)
    result = OptimizeResult(path, False, table, manifest)
    if tracking is not None:
        log_stage(tracking, STAGE, **tracking_summary(config, result))
    return result


def _apply_budget(variants: list[Variant], parent: Variant, budget: float) -> None:
    """Reject every candidate that loses more than ``budget`` test top-1 against the fp32 parent.

    The test split is the one the evaluate gate and the bench table use; the validation drop is reported beside it.
    """
    for v in variants:
        if v is parent or v.test_acc is None or parent.test_acc is None:
            continue
        drop = parent.test_acc - v.test_acc
        v.settings["test_drop"] = round(drop, 6)
        if parent.val_acc is not None and v.val_acc is not None:
            v.settings["val_drop"] = round(parent.val_acc - v.val_acc, 6)
        if drop > budget + _TOLERANCE and v.role == "candidate" and v.status == "ok":
            v.status = "rejected"
            v.reason = (f"loses {100 * drop:.2f} points of test top-1 against fp32; the budget is "
                        f"{100 * budget:.2f} (optimize.accuracy_budget)")


class _VariantMaker:
    """Makes, scores and writes variants; one method per method."""

    def __init__(self, config: SignpostConfig, card: ModelCard, parent_key: str, model_dir: Path, data_dir: Path,
                 val: CachedSplit, test: CachedSplit, *, progress: bool) -> None:
        self.config, self.card, self.parent_key = config, card, parent_key
        self.model_dir, self.data_dir = model_dir, data_dir
        self.val, self.test, self.progress = val, test, progress
        self.example = torch.randn(2, 3, card.image_size, card.image_size)
        self.parent_test_acc: float | None = None  # set by the fp32 variant, which comes first

    # --- float variants: weights + card, exported forms ------------------------------------------------------

    def float_variant(self, root: Path, name: str, method: str, model: nn.Module, settings: dict[str, Any],
                      card: ModelCard, role: str = "candidate") -> Variant:
        variant = Variant(name, method, settings, path=name, role=role)
        folder = root / name
        started = time.perf_counter()
        with _failures(variant):
            folder.mkdir()
            model = model.eval()
            save_model(folder, model, card)
            variant.forms.append("weights")
            variant.val_acc, variant.test_acc = self._scores(model)
            variant.size_bytes = (folder / WEIGHTS).stat().st_size
            variant.parameters = count_parameters(model)
            variant.mflops = count_mflops(model, card.image_size)
            if name == "fp32":
                self.parent_test_acc = variant.test_acc
            if role == "candidate" and self._within_budget(variant):
                self._exports(folder, model, variant)
                self._executorch(folder, model, variant, card)
                self._openvino(folder, model, variant, card)
            self._finish(folder, variant, card)
        variant.seconds = time.perf_counter() - started
        return variant

    def _exports(self, folder: Path, model: nn.Module | torch.export.ExportedProgram, variant: Variant) -> None:
        """The AOTInductor package and the ONNX file; a failing export is noted, the variant keeps its other forms."""
        opt = self.config.optimize
        if opt.export_aoti:
            try:
                write_aoti(model, self.example, folder / AOTI)
                variant.forms.append("aoti")
                if opt.aoti_bf16 and isinstance(model, nn.Module):
                    write_aoti(model, self.example, folder / AOTI_BF16, bf16=True)
                    variant.forms.append("aoti_bf16")
            except Exception as exc:  # Inductor and its C++ compiler can fail in many ways
                log.warning("%s: AOTInductor packaging failed: %s", variant.name, exc)
                variant.settings["aoti_error"] = _short(exc)
        if opt.export_onnx and isinstance(model, nn.Module):
            try:
                write_onnx(model, self.example, folder / ONNX)
                variant.forms.append("onnx")
            except Exception as exc:
                log.warning("%s: ONNX export failed: %s", variant.name, exc)
                variant.settings["onnx_error"] = _short(exc)

    def _held_to_budget(self, variant: Variant, forward: Callable[[torch.Tensor], torch.Tensor],
                        what: str) -> dict[str, float]:
        """Val and test top-1 of a form that is its own quantization of the float parent (``what``), held to the
        accuracy budget like the variant; ``ValueError`` past it."""
        val_acc, test_acc = self._scores(forward)
        if not self._within_budget(Variant(variant.name, variant.method, {}, test_acc=test_acc)):
            raise ValueError(f"{what} scores {100 * test_acc:.2f}% test top-1, over the accuracy budget against fp32 "
                             "(optimize.accuracy_budget)")
        return {"val_acc": val_acc, "test_acc": test_acc}

    def _executorch(self, folder: Path, model: nn.Module, variant: Variant, card: ModelCard, *,
                    int8: str | None = None, calibration: list[torch.Tensor] | None = None) -> None:
        """The XNNPACK ExecuTorch program, from the float ``model`` (quantized for XNNPACK when ``int8`` names a
        scheme), scored on the program itself; a model it cannot lower, a machine without executorch, or a program
        over the accuracy budget is noted, and the variant keeps its other forms."""
        if not self.config.optimize.export_executorch:
            return
        try:
            settings = write_executorch(model, card.image_size, folder / PTE, int8=int8, calibration=calibration or [])
            # XNNPACK's int8 is its own quantization of the float parent: held to the budget like the variant
            forward = executorch_forward((folder / PTE).read_bytes(), folder / PTE)
            settings |= self._held_to_budget(variant, forward, "the program")
            variant.forms.append("executorch")
            variant.settings["executorch"] = settings
        except Exception as exc:  # an op XNNPACK cannot take, a version mismatch, executorch not installed
            (folder / PTE).unlink(missing_ok=True)  # a half-written program is never listed in the manifest
            log.warning("%s: ExecuTorch export failed: %s", variant.name, exc)
            variant.settings["executorch_error"] = _short(exc)

    def _openvino(self, folder: Path, model: nn.Module, variant: Variant, card: ModelCard, *,
                  calibration: list[torch.Tensor] | None = None) -> None:
        """The OpenVINO IR of the float ``model`` (quantized by NNCF on ``calibration`` when given); a model it
        cannot convert, a machine without openvino, or an int8 IR over the accuracy budget is noted, and the variant
        keeps its other forms."""
        if not self.config.optimize.export_openvino:
            return
        try:
            settings = write_openvino(model, card.image_size, folder, calibration=calibration)
            if calibration is not None:
                # NNCF's int8 is its own quantization of the float parent: held to the budget like the variant
                forward, _ = openvino_forward((folder / OV_XML).read_bytes(), (folder / OV_BIN).read_bytes(),
                                              batches=(_EVAL_BATCH,))
                settings |= self._held_to_budget(variant, forward, "NNCF int8")
            variant.forms.append("openvino")
            variant.settings["openvino"] = settings
        except Exception as exc:  # an op OpenVINO cannot convert, openvino or nncf not installed, over the budget
            for name in (OV_XML, OV_BIN):  # a half-written or rejected IR is never listed in the manifest
                (folder / name).unlink(missing_ok=True)
            log.warning("%s: OpenVINO export failed: %s", variant.name, exc)
            variant.settings["openvino_error"] = _short(exc)

    def _within_budget(self, variant: Variant) -> bool:
        """Whether ``variant`` is within the accuracy budget; over it, it gets no exported forms (it is never
        shipped, and AOTInductor packaging is the slowest step here). ``_apply_budget`` marks it afterwards."""
        if self.parent_test_acc is None or variant.test_acc is None:
            return True
        return self.parent_test_acc - variant.test_acc <= self.config.optimize.accuracy_budget + _TOLERANCE

    # --- int8 ------------------------------------------------------------------------------------------------

    def int8_variant(self, root: Path, name: str, parent: nn.Module, *, dynamic: bool,
                     card: ModelCard | None = None, source: str = "fp32") -> Variant:
        """int8 of ``parent`` (the fp32 model, or another float variant named by ``source`` with its ``card``)."""
        opt = self.config.optimize
        card = card or self.card
        variant = Variant(name, "int8-dynamic" if dynamic else "int8-static", {}, path=name)
        folder = root / name
        started = time.perf_counter()
        with _failures(variant):
            folder.mkdir()
            calibration = [] if dynamic else self._calibration_batches()
            program, variant.settings = quantize_int8(parent, calibration, self.example, dynamic=dynamic)
            variant.settings |= {"calibration_batch_size": 0 if dynamic else opt.calibration_batch_size,
                                 "source": source}
            variant.val_acc, variant.test_acc = self._scores(program.module())
            variant.forms.append("program")
            if self._within_budget(variant):
                self._exports(folder, program, variant)  # before saving, which drops the example inputs AOTI needs
                self._executorch(folder, parent, variant, card, int8="dynamic" if dynamic else "static",
                                 calibration=calibration)
                if dynamic and opt.export_openvino:
                    variant.settings["openvino_error"] = ("NNCF quantizes activations statically: OpenVINO has no "
                                                          "dynamic int8 form of this variant")
                else:
                    self._openvino(folder, parent, variant, card, calibration=calibration)
            save_program(program, folder / PROGRAM)
            (folder / CARD).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
            variant.size_bytes = (folder / PROGRAM).stat().st_size
            variant.parameters = count_parameters(parent)
            variant.mflops = count_mflops(parent, card.image_size)
            self._finish(folder, variant, card)
        variant.seconds = time.perf_counter() - started
        return variant

    def dynamic_int8_variant(self, root: Path, parent: nn.Module) -> Variant:
        linear = sum(m.weight.numel() for m in parent.modules() if isinstance(m, nn.Linear))
        share = linear / max(1, count_parameters(parent))
        if not any(isinstance(m, nn.Linear) and m.in_features >= 512 for m in parent.modules()):
            return Variant("dynamic-int8", "int8-dynamic", {"linear_weight_share": round(share, 4)},
                           status="skipped", reason="dynamic int8 quantizes Linear layers only; this model's are "
                           "too small to gain from it (no Linear with 512+ inputs)")
        return self.int8_variant(root, "dynamic-int8", parent, dynamic=True)

    @functools.cache  # noqa: B019 - one maker per optimize call; int8 and pruned-int8 share the batches
    def _calibration_batches(self) -> list[torch.Tensor]:
        """The first ``optimize.calibration_batches`` training batches, normalized as in training, not augmented."""
        count = self.config.optimize.calibration_batches
        train = load_split(self.data_dir / "train.safetensors")
        loader = BatchLoader(train.images, train.labels, self.config.optimize.calibration_batch_size,
                             mean=self.card.mean, std=self.card.std, shuffle=True, seed=self.config.seed)
        loader.set_epoch(0)
        batches = []
        for x, _ in loader:
            batches.append(x.contiguous())
            if len(batches) == count:
                break
        return batches

    # --- pruning and distillation: training runs of the training engine -----------------------------------------

    def pruned_variant(self, root: Path, parent: nn.Module) -> Variant:
        cfg = self.config.optimize.prune
        settings: dict[str, Any] = {"ratio": cfg.ratio, "finetune_epochs": cfg.finetune_epochs,
                                    "finetune_lr": cfg.finetune_lr, "importance": "BN scale x filter L1"}
        variant = Variant("pruned", "structured-pruning", settings, path="pruned")
        with _failures(variant):
            pruned, options = prune_model(parent, cfg.ratio)
            settings |= options
            if cfg.finetune_epochs == 0:
                card = self.card.model_copy(update={"architecture_options": options})
                return self.float_variant(root, "pruned", "structured-pruning", pruned, settings, card)
            derived = Derived(TRAINING, f"{self.config.name}-pruned", {"method": "prune", "parent": self.parent_key,
                              "ratio": cfg.ratio}, architecture_options=options, initial=pruned.state_dict())
            train_overrides = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, "model": self.card.architecture,
                               "warmup_epochs": min(0.5, cfg.finetune_epochs / 4)}
            model, card = self._train(derived, train_overrides)
            return self.float_variant(root, "pruned", "structured-pruning", model, settings, card)
        return variant

    def student_variants(self, root: Path, parent: nn.Module) -> list[Variant]:
        cfg = self.config.optimize.distill
        options = {"widths": list(cfg.student_widths)}
        overrides = {"model": "signnet", "epochs": cfg.epochs or self.config.train.epochs}
        out = []
        for name, teacher in (("student", parent), ("student-alone", None)):
            settings = {"widths": options["widths"], "epochs": overrides["epochs"]}
            if teacher is not None:
                settings |= {"temperature": cfg.temperature, "alpha": cfg.alpha, "teacher": self.card.architecture}
            variant = Variant(name, "distillation" if teacher is not None else "student-baseline", settings, path=name)
            with _failures(variant):
                identity = {"method": name, "parent": self.parent_key, **settings}
                derived = Derived(TRAINING, f"{self.config.name}-{name}", identity, architecture_options=options,
                                  teacher=teacher, temperature=cfg.temperature, alpha=cfg.alpha if teacher else 0.0)
                model, card = self._train(derived, overrides)
                role = "candidate" if teacher is not None else "control"
                variant = self.float_variant(root, name, variant.method, model, settings, card, role=role)
            out.append(variant)
        return out

    def _train(self, derived: Derived, overrides: dict[str, Any]) -> tuple[nn.Module, ModelCard]:
        """Train (or reuse) the derived model with ``config.train`` changed by ``overrides``; its artifact sits
        beside this one."""
        config = self.config.model_copy(update={"train": self.config.train.model_copy(update=overrides)})
        return train_derived(config, self.data_dir, derived, progress=self.progress)

    # --- shared ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _scores(self, model: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
        return accuracy(model, self.val, self.card), accuracy(model, self.test, self.card)

    def _finish(self, folder: Path, variant: Variant, card: ModelCard) -> None:
        metrics = {"val_acc": variant.val_acc, "test_acc": variant.test_acc}
        write_manifest(
            folder, stage=f"{STAGE}.variant", key=hash_json([self.parent_key, variant.name, variant.settings]),
            experiment=self.config.name,
            inputs={"parent_model": self.model_dir.name, "parent_key": self.parent_key, "data": self.data_dir.name},
            config={"method": variant.method, **variant.settings}, code=code_version(*_CODE), metrics=metrics,
            extra={"variant": variant.name, "role": variant.role, "forms": variant.forms,
                   "architecture": card.architecture, "architecture_options": card.architecture_options,
                   # The verdict travels with the folder, so a variant picked up on its own still says it.
                   "within_budget": self._within_budget(variant), "parent_test_acc": self.parent_test_acc,
                   "accuracy_budget": self.config.optimize.accuracy_budget},
        )


@torch.inference_mode()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], split: CachedSplit, card: ModelCard) -> float:
    """Top-1 accuracy of ``model`` (any callable from a normalized batch to logits) on a cached split."""
    if len(split) == 0:
        return float("nan")
    if isinstance(model, nn.Module) and not isinstance(model, torch.fx.GraphModule):
        model.eval()  # an exported program's module is in eval form already (and refuses .eval())
    loader = BatchLoader(split.images, split.labels, _EVAL_BATCH, mean=card.mean, std=card.std, shuffle=False)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(split)


def count_mflops(model: nn.Module, image_size: int) -> float:
    """Forward FLOPs per image in millions (a multiply-add counts 2), from PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e6


class _failures:
    """Record any exception of a variant's making as its ``failed`` status instead of stopping the stage."""

    def __init__(self, variant: Variant) -> None:
        self.variant = variant

    def __enter__(self) -> Variant:
        return self.variant

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # KeyboardInterrupt and SystemExit stop the stage
        log.warning("variant %s failed: %s", self.variant.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        self.variant.status, self.variant.reason = "failed", _short(exc)
        return True


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _kb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024:.0f} KiB"
