"""train: prepared data → a trained model artifact (safetensors weights + model card), resumable and distributed.

One recipe, read top to bottom: ``Recipe.__init__`` checks the config and the data, ``setup`` builds the model,
optimizer and loaders, ``run`` trains with validation every epoch, and ``finish`` writes the artifact. The same
code runs in one process or under ``torchrun --nproc-per-node N`` (DistributedDataParallel: gloo on CPU, NCCL on
GPU), where rank 0 alone writes files.

Checkpoints hold everything needed to continue bit for bit on the same machine: weights, the best epoch's weights,
optimizer state, the step within the epoch, the augmentation generator of every rank, the global RNG, the running
sums of the epoch and the history. They are written at the end of every epoch and when SIGINT or SIGTERM arrives;
``resume=True`` continues from the last one, also after a SIGKILL. A checkpoint is one file (the tensors in
safetensors, the rest as JSON in its header, with a SHA-256 of both) that replaces the previous one only by a
rename, so a kill at any moment leaves one whole checkpoint, never parts of two. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn
from tqdm import tqdm

from signpost.artifacts import (
    artifact_path,
    atomic_dir,
    code_version,
    git_revision,
    hash_json,
    is_complete,
    library_versions,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from signpost.config import SignpostConfig, config_to_dict
from signpost.data.cache import load_split
from signpost.data.loader import BatchLoader
from signpost.models import build_model
from signpost.models.artifact import ModelCard, save_model, unwrap
from signpost.report.plots import training_curves_png
from signpost.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

STAGE = "train"
_CODE = ("signpost.stages.train", "signpost.models", "signpost.data.loader")
CHECKPOINT = "checkpoint.safetensors"
# Header metadata keys of a checkpoint: the JSON state, and the SHA-256 of that state and every tensor.
_STATE, _DIGEST = "signpost.checkpoint", "signpost.sha256"


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; ``resume=True`` continues."""


@dataclass
class TrainResult:
    """Where the model artifact is, and whether an existing one was reused."""

    path: Path
    reused: bool
    manifest: dict[str, Any]


EpochCallback = Callable[[dict[str, float], int], None]


@dataclass
class Derived:
    """A model the optimize stage trains from another: where it starts, what teaches it, where it is written.

    ``identity`` (method, parent model key, settings) goes into the artifact key; ``initial`` are starting weights
    (a pruned model's) instead of a fresh initialisation; with a ``teacher`` the loss is knowledge distillation:
    ``(1 - alpha) * CE(labels) + alpha * T² * KL(teacher_T || student_T)`` on logits softened by ``temperature``.
    """

    stage: str
    name: str
    identity: dict[str, Any]
    architecture_options: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, torch.Tensor] | None = None
    teacher: nn.Module | None = None
    temperature: float = 1.0
    alpha: float = 0.0


@dataclass(frozen=True)
class Schedule:
    """How long a run trains, in epochs and optimizer steps, and whether ``train.min_steps`` lengthened it."""

    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    configured_epochs: int
    min_steps: int

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def raised(self) -> bool:
        return self.epochs > self.configured_epochs

    def note(self) -> str:
        """One line saying what was done when the dataset was too small for the configured epochs ('' if not)."""
        if not self.raised:
            return ""
        return (
            f"the dataset is too small for the schedule: {self.configured_epochs} epochs of {self.steps_per_epoch} "
            f"optimizer steps would be {self.configured_epochs * self.steps_per_epoch} steps, under "
            f"train.min_steps={self.min_steps}; training {self.epochs} epochs ({self.total_steps} steps) instead, "
            f"with {self.warmup_steps} warm-up steps (lower train.batch_size for more steps per epoch, or set "
            "train.min_steps=0 to keep the epochs)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "configured_epochs": self.configured_epochs,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "min_steps": self.min_steps, "raised": self.raised,
                "note": self.note()}


def plan_schedule(epochs: int, steps_per_epoch: int, *, min_steps: int = 0, warmup_epochs: float = 0.0) -> Schedule:
    """The training schedule for a split that gives ``steps_per_epoch`` optimizer steps per epoch.

    ``epochs`` as configured, unless they give fewer than ``min_steps`` steps: then just enough epochs to reach it, so
    that one config trains a 3,000-image copy as long (in steps) as the 39,000-image original. The warm-up keeps its
    share of the schedule (``warmup_epochs / epochs``), so a lengthened run warms up over as many more steps.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"a schedule needs at least one optimizer step per epoch, not {steps_per_epoch}")
    raised = max(epochs, math.ceil(min_steps / steps_per_epoch))
    warmup = round(warmup_epochs * steps_per_epoch * (raised / epochs))  # exactly as before when not raised
    return Schedule(epochs=raised, steps_per_epoch=steps_per_epoch, warmup_steps=warmup, configured_epochs=epochs,
                    min_steps=min_steps)


def train(
    config: SignpostConfig,
    *,
    data_dir: Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
    tracking: Callable[[str], Tracker] | None = None,
) -> TrainResult:
    """Train ``config.train.model`` on the prepared data in ``data_dir``; reuse the artifact when inputs match.

    ``tracking`` makes a tracking run (see ``signpost.tracking.run_factory``); it is called only when training
    actually happens, on rank 0: the run gets the resolved config, per-epoch metrics, system metrics and the model.
    """
    recipe = Recipe(config, data_dir, progress=progress, on_epoch=on_epoch)
    try:
        if is_complete(recipe.path):
            return TrainResult(recipe.path, True, read_manifest(recipe.path))
        tracker = tracking(STAGE) if tracking is not None and recipe.rank == 0 else NullTracker()
        with tracker:
            tracker.log_params(config_to_dict(config))
            tracker.set_tags({"signpost.stage": STAGE, "signpost.data": recipe.data_dir.name})
            recipe.track(tracker)
            recipe.setup(resume=resume)
            recipe.run()
            result = recipe.finish()
            if result.manifest:
                tracker.log_artifact(result.path, "model")
        return result
    finally:
        recipe.cleanup()


class Recipe:
    """The training recipe: config and data checked up front, then setup → run → finish."""

    def __init__(
        self,
        config: SignpostConfig,
        data_dir: Path,
        *,
        progress: bool = True,
        on_epoch: EpochCallback | None = None,
        derived: Derived | None = None,
    ) -> None:
        self.config, self.cfg = config, config.train
        self.derived = derived
        self.stage = derived.stage if derived else STAGE
        self.data_dir = Path(data_dir)
        self.data_manifest = verify_artifact(self.data_dir, ["train.safetensors", "val.safetensors"])
        if self.data_manifest.get("stage") != "data":
            raise ValueError(f"{self.data_dir} is a {self.data_manifest.get('stage')!r} artifact, not prepared data")
        self.dataset = self.data_manifest["dataset"]
        self.rank, self.world_size, local_rank = _init_distributed(self.cfg.device)
        self.device = _pick_device(self.cfg.device, local_rank)
        if self.cfg.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size={self.cfg.batch_size} does not divide over {self.world_size} processes: "
                "choose a multiple of --nproc-per-node"
            )
        self.bf16 = _use_bf16(self.cfg.bf16, self.device)
        self.key = hash_json(
            {
                "data": self.data_manifest["key"],
                "train": config_to_dict(self.cfg),
                "seed": config.seed,
                "world_size": self.world_size,
                "code": code_version(*_CODE),
            }
            | ({"derived": derived.identity} if derived else {})
        )
        self.path = artifact_path(config.workdir, self.stage, derived.name if derived else config.name, self.key)
        self.checkpoint_dir = config.workdir / self.stage / ".checkpoints" / self.path.name
        self.progress = progress and self.rank == 0
        self.on_epoch = [on_epoch] if on_epoch is not None and self.rank == 0 else []
        self.tracking_run: str | None = None  # the MLflow run this training reports to, recorded in the manifest
        self._stop_signal: int | None = None

    def track(self, tracker: Tracker) -> None:
        """Report every epoch's metrics to ``tracker`` too, and record its run in the artifact's manifest."""
        self.tracking_run = tracker.run_id
        self.on_epoch.append(lambda metrics, epoch: tracker.log_metrics(metrics, step=epoch))

    # --- setup ---------------------------------------------------------------------------------------------------

    def setup(self, *, resume: bool) -> None:
        """Model, optimizer and loaders; with ``resume``, the state of the last checkpoint."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(self.config.seed)  # the same initial weights on every rank and every run
        train_split = load_split(self.data_dir / "train.safetensors")
        self.val = load_split(self.data_dir / "val.safetensors")
        options = self.derived.architecture_options if self.derived else {}
        model = build_model(cfg.model, self.dataset["num_classes"], self.dataset["image_size"], **options)
        if self.derived and self.derived.initial is not None:
            model.load_state_dict(self.derived.initial)
        model = model.to(self.device)
        self.teacher = self.derived.teacher if self.derived else None
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.teacher is not None:
            self.teacher = self.teacher.to(self.device).eval()
            if cfg.channels_last:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = _optimizer(model, cfg)
        self.net: nn.Module = model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.loader = BatchLoader(
            train_split.images, train_split.labels, cfg.batch_size // self.world_size,
            mean=self.dataset["mean"], std=self.dataset["std"], augment=cfg.augment, shuffle=True, drop_last=True,
            seed=self.config.seed, rank=self.rank, world_size=self.world_size, device=self.device,
            channels_last=cfg.channels_last,
        )
        if len(self.loader) == 0:
            raise ValueError(
                f"train.batch_size={cfg.batch_size} is larger than the training split "
                f"({len(train_split)} images): lower it"
            )
        # The schedule is a pure function of the config and the split's size, so a resumed run plans the same one.
        self.schedule = plan_schedule(cfg.epochs, len(self.loader), min_steps=cfg.min_steps,
                                      warmup_epochs=cfg.warmup_epochs)
        self.steps_per_epoch, self.total_steps = self.schedule.steps_per_epoch, self.schedule.total_steps
        if self.schedule.raised and self.rank == 0:
            who = f"{self.stage} {self.derived.name}" if self.derived else self.stage
            log.warning("%s on %s (%d training images): %s", who, self.data_dir.name, len(train_split),
                        self.schedule.note())
        self.epoch, self.batch, self.history = 0, 0, []
        # Loss sum, correct and seen images of the epoch so far; float64 except on MPS, which has none.
        self.sums = torch.zeros(3, dtype=torch.float32 if self.device.type == "mps" else torch.float64,
                                device=self.device)
        self.best = {"val_acc": -1.0, "epoch": -1}
        self.best_weights: dict[str, torch.Tensor] | None = None  # on CPU, rank 0; checkpointed with the rest
        self.aug_states: list[torch.Tensor] | None = None
        if resume:
            self._load_checkpoint()
        elif (self.checkpoint_dir / CHECKPOINT).is_file():
            log.warning("%s holds a checkpoint of this run; starting over (pass --resume to continue)",
                        self.checkpoint_dir)

    # --- the loop --------------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train the remaining epochs, validating after each; a stop signal saves a checkpoint and raises."""
        with _stop_signals(self._on_signal):
            while self.epoch < self.schedule.epochs:
                self.train_epoch()
                if self._should_stop():
                    self._save_checkpoint()
                    raise TrainingInterrupted(
                        f"stopped by signal {self._stop_signal} in epoch {self.epoch + 1}, batch {self.batch}; "
                        f"checkpoint in {self.checkpoint_dir}: run again with --resume to continue"
                    )
                self.end_epoch()

    def train_epoch(self) -> None:
        """One pass over this rank's shard (or its rest, after a resume); returns early on a stop signal."""
        self.net.train()
        self.loader.set_epoch(self.epoch)
        aug_state = self.aug_states[self.rank] if self.aug_states is not None else None
        self.aug_states = None
        batches = self.loader.iterate(start=self.batch, generator_state=aug_state)
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch,
                   desc=f"epoch {self.epoch + 1}/{self.schedule.epochs}", unit="step", disable=not self.progress,
                   file=sys.stderr, leave=False)
        started, seen_before = time.perf_counter(), self.sums[2].item()
        with bar:
            for x, y in batches:
                self._set_lr(self.epoch * self.steps_per_epoch + self.batch)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    logits = self.net(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
                    if self.teacher is not None:
                        loss = self._distill(loss, logits.float(), x)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                self.optimizer.step()
                with torch.no_grad():
                    n = torch.tensor(float(y.numel()), device=self.device)
                    step_sums = torch.stack([loss.detach().float() * n, (logits.argmax(1) == y).sum().float(), n])
                    self.sums += step_sums.to(self.sums.dtype)
                self.batch += 1
                if self.progress and (self.batch % 10 == 0 or self.batch == self.steps_per_epoch):
                    # .item() is a host-device sync: only every 10 steps, for the progress bar.
                    loss_sum, correct, seen = self.sums.tolist()
                    rate = (seen - seen_before) * self.world_size / (time.perf_counter() - started)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:,.0f}")
                bar.update(1)
                if self._should_stop():
                    return

    def end_epoch(self) -> None:
        """Validate, record the epoch, keep the best weights, and checkpoint."""
        sums = self.sums.clone()
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, seen = sums.tolist()
        val_loss, val_acc = self._validate()
        record = {
            "epoch": self.epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        self.history.append(record)
        log.info("epoch %d: train loss %.4f acc %.4f, val loss %.4f acc %.4f", record["epoch"],
                 record["train_loss"], record["train_acc"], val_loss, val_acc)
        if val_acc > self.best["val_acc"] and self.rank == 0:
            self.best = {"val_acc": val_acc, "epoch": self.epoch + 1}
            # A copy: on CPU, _weights() are the live parameters, which the next step changes.
            self.best_weights = {k: v.clone() for k, v in self._weights().items()}
        for callback in self.on_epoch:
            callback({k: v for k, v in record.items() if k != "epoch"}, self.epoch + 1)
        self.epoch, self.batch = self.epoch + 1, 0
        self.sums.zero_()
        self._save_checkpoint()

    def _distill(self, label_loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Mix the label loss with the KL divergence to the teacher's softened outputs (Hinton et al., 2015)."""
        assert self.derived is not None and self.teacher is not None
        t, alpha = self.derived.temperature, self.derived.alpha
        with torch.no_grad():
            soft_targets = F.log_softmax(self.teacher(x).float() / t, dim=1)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft_targets, reduction="batchmean", log_target=True)
        return (1 - alpha) * label_loss + alpha * t * t * kd

    @torch.inference_mode()
    def _validate(self) -> tuple[float, float]:
        """Loss and accuracy on the whole validation split, computed the same way on every rank."""
        self.model.eval()
        loader = BatchLoader(
            self.val.images, self.val.labels, 512, mean=self.dataset["mean"], std=self.dataset["std"],
            shuffle=False, device=self.device, channels_last=self.cfg.channels_last,
        )
        loss_sum = correct = 0.0
        for x, y in loader:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        return loss_sum / len(self.val), correct / len(self.val)

    def _set_lr(self, step: int) -> None:
        """Linear warm-up, then cosine decay to zero or the one-cycle shape; a pure function of the step, so a
        resumed run needs no scheduler state."""
        # cosine: from 0 up to the peak, then down to 0. one-cycle (as torch's OneCycleLR with its defaults): from
        # peak/25 up to the peak, then down to peak/250,000.
        start, end = (1 / 25, 1 / 250_000) if self.cfg.schedule == "onecycle" else (0.0, 0.0)
        warmup = self.schedule.warmup_steps
        if step < warmup:
            factor = start + (1 - start) * (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
            factor = end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * factor

    # --- signals and checkpoints -----------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum  # acted on after the current step, where the state is consistent

    def _should_stop(self) -> bool:
        stop = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        if self.world_size > 1:
            dist.all_reduce(stop)  # all ranks stop at the same step, or a checkpoint would mix steps
        if stop.item() and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM  # another rank was signalled
        return bool(stop.item())

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in unwrap(self.model).state_dict().items()}

    def _save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0): every tensor and the JSON state in one file that replaces the last one."""
        aug_states = self._gather_aug_states()
        if self.rank != 0:
            return
        tensors = {f"model.{k}": v for k, v in self._weights().items()}
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        tensors |= opt_tensors
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for r, state in enumerate(aug_states or []):
            tensors[f"rng.augment.{r}"] = state
        tensors["sums"] = self.sums.cpu()
        tensors |= {f"best.{k}": v for k, v in (self.best_weights or {}).items()}
        state = json.dumps({
            "key": self.key,
            "epoch": self.epoch,
            "batch": self.batch,
            "history": self.history,
            "best": self.best,
            "optimizer": opt_meta,
        })
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # Serialized in memory (one more copy of the checkpoint: 2.6 MiB for signnet, 4.8 MiB for traffic_sign_net)
        # so that the file is written by the plain os calls of _write_atomic.
        data = save(tensors, metadata={_STATE: state, _DIGEST: _digest(tensors, state)})
        _write_atomic(data, self.checkpoint_dir / CHECKPOINT)
        log.info("checkpoint: epoch %d, batch %d in %s", self.epoch, self.batch, self.checkpoint_dir)

    def _gather_aug_states(self) -> list[torch.Tensor] | None:
        """Every rank's augmentation generator state, mid-epoch (at an epoch boundary they restart seeded)."""
        generator = self.loader.generator
        if self.batch == 0 or generator is None:
            return None
        state = generator.get_state()
        if self.world_size == 1:
            return [state]
        # NCCL gathers device tensors only, gloo CPU ones: gather on the training device, keep CPU copies.
        local = state.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        return [g.cpu() for g in gathered]

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_dir / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint for this run in {self.checkpoint_dir} (the run's settings or data may "
                "differ from the interrupted one); run without --resume to start over"
            )
        tensors, state = _read_checkpoint(path)
        if state.get("key") != self.key:
            raise ValueError(f"{path} belongs to another run (key {state.get('key')}), not {self.key}")
        unwrap(self.model).load_state_dict(
            {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        )
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"], self.device))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        augment = sorted((k for k in tensors if k.startswith("rng.augment.")), key=lambda k: int(k.rsplit(".", 1)[1]))
        self.aug_states = [tensors[k] for k in augment] or None
        self.sums = tensors["sums"].to(self.device)
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.history, self.best = state["history"], state["best"]
        self.best_weights = {k.removeprefix("best."): v for k, v in tensors.items() if k.startswith("best.")} or None
        log.info("resuming at epoch %d, batch %d from %s", self.epoch + 1, self.batch, self.checkpoint_dir)

    # --- the artifact ----------------------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """Write the model artifact (rank 0) from the best epoch's weights; the checkpoints are then removed."""
        if self.rank != 0:
            dist.barrier()
            return TrainResult(self.path, False, {})
        assert self.best_weights is not None, "the first epoch sets them (any val_acc beats -1)"
        unwrap(self.model).load_state_dict(self.best_weights)
        final = self.history[-1]
        card = ModelCard(
            architecture=self.cfg.model,
            architecture_options=self.derived.architecture_options if self.derived else {},
            num_classes=self.dataset["num_classes"],
            class_names=self.dataset["class_names"],
            image_size=self.dataset["image_size"],
            mean=self.dataset["mean"],
            std=self.dataset["std"],
            # epochs and optimizer_steps as trained: more than train.epochs when min_steps raised them.
            metrics={"val_acc": self.best["val_acc"], "best_epoch": self.best["epoch"],
                     "final_val_acc": final["val_acc"], "final_train_acc": final["train_acc"],
                     "epochs": self.schedule.epochs, "optimizer_steps": self.schedule.total_steps},
            data_artifact=self.data_dir.name,
            data_key=self.data_manifest["key"],
            config=config_to_dict(self.config),
            code_version=code_version(*_CODE),
            git_revision=git_revision(),
            libraries=library_versions(),
        )
        with atomic_dir(self.path) as tmp:
            save_model(tmp, self.model, card)
            (tmp / "history.json").write_text(json.dumps(self.history, indent=1), encoding="utf-8")
            training_curves_png(self.history, tmp / "training_curves.png")
            manifest = write_manifest(
                tmp,
                stage=self.stage,
                key=self.key,
                experiment=self.config.name,
                inputs={"data": self.data_dir.name, "data_key": self.data_manifest["key"]},
                config=config_to_dict(self.cfg) | {"seed": self.config.seed, "world_size": self.world_size},
                code=code_version(*_CODE),
                metrics=card.metrics,
                extra={"history": self.history, "schedule": self.schedule.to_dict(), "device": str(self.device),
                       "bf16": self.bf16, "tracking_run": self.tracking_run}
                | ({"derived": self.derived.identity} if self.derived else {}),
            )
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)  # this run's folder, old-layout leftovers included
        if self.world_size > 1:
            dist.barrier()
        return TrainResult(self.path, False, manifest)

    def cleanup(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --- helpers ---------------------------------------------------------------------------------------------------


def _init_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world size, local rank); joins the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        use_nccl = device in ("auto", "cuda") and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is available: use train.device=auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if choice == "mps" or (choice == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise ValueError("train.device=mps but MPS is not available: use train.device=auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def _use_bf16(choice: str, device: torch.device) -> bool:
    """bf16 autocast where it is fast and well tested: CUDA GPUs that support it. On CPU only when asked."""
    if choice == "off":
        return False
    if choice == "on":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _optimizer(model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; no weight decay on biases and batch-norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as named tensors (for safetensors) and JSON-able metadata."""
    tensors, scalars = {}, {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value.to(device)
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsynced, then renamed over ``path``.

    Until the rename ``path`` holds its old bytes whole, after it the new ones: a kill at any point leaves one or
    the other, never a mix. The folder is fsynced too, so that the rename also survives a power cut. Plain os calls
    (tests/security/test_checkpoint_kill.py interrupts the write at each of them).
    """
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]  # a write may take fewer bytes than asked (at most 2 GiB on Linux)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's tensors and JSON state; a ValueError naming the fix unless it is whole and unchanged."""
    fix = f"run without --resume to start over (or delete {path.parent})"
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path} is damaged ({exc}): {fix}") from exc
    if _STATE not in metadata:
        raise ValueError(
            f"{path} has no training state in it: it was written by an older Signpost, whose two-file checkpoints "
            f"cannot be trusted to match; {fix}"
        )
    if metadata.get(_DIGEST) != _digest(tensors, metadata[_STATE]):
        raise ValueError(f"{path} is damaged (its contents do not match the SHA-256 written with them): {fix}")
    return tensors, json.loads(metadata[_STATE])


def _digest(tensors: dict[str, torch.Tensor], state: str) -> str:
    """Hex SHA-256 of a checkpoint's JSON state and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(state.encode("utf-8"))
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\n{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@contextlib.contextmanager
def _stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """Route SIGINT and SIGTERM to ``handler`` inside the block, restoring the previous handlers after.

    Python only delivers signals to the main thread; elsewhere (a test's worker thread) nothing is installed.
    """
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
