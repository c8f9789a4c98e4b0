"""The training recipe, read top to bottom: one run from prepared data to a model artifact, and ``train_derived``.

``Recipe.__init__`` checks the config and the data, ``setup`` builds the model, optimizer and loaders (and restores
a checkpoint with ``resume``), ``run`` trains with validation every epoch, checkpointing after each and when SIGINT
or SIGTERM arrives, and ``finish`` writes the artifact (``fit`` runs the three in order, for both stages). Under
``torchrun`` rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
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
    verify_artifact,
    write_manifest,
)
from signpost.config import SignpostConfig, config_to_dict
from signpost.data.cache import load_split
from signpost.data.loader import BatchLoader
from signpost.models import build_model
from signpost.models.artifact import ModelCard, load_model, save_model, unwrap
from signpost.report.plots import training_curves_png
from signpost.tracking import Tracker
from signpost.training.checkpoint import (
    CHECKPOINT,
    flatten_optimizer,
    read_checkpoint,
    unflatten_optimizer,
    write_checkpoint,
)
from signpost.training.distributed import init_distributed, pick_device, stop_signals, use_bf16
from signpost.training.schedule import make_optimizer, plan_schedule

log = logging.getLogger(__name__)

# The code a trained model's key (and so its artifact and checkpoint folder) is derived from: a change to the engine
# trains anew instead of reusing, or resuming, what the old engine made. The package, every module of it.
_CODE = ("signpost.training", "signpost.models", "signpost.data.loader")
# Where a model trained from the config alone is written (the train stage's folder); a Derived model names its own.
_STAGE = "train"


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; ``resume=True`` continues."""


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


def train_derived(
    config: SignpostConfig, data_dir: Path, derived: Derived, *, progress: bool = True
) -> tuple[nn.Module, ModelCard]:
    """Train the model ``derived`` describes with ``config.train`` on ``data_dir`` (or reuse its artifact); load it.

    The optimize stage's fine-tunes and students. A checkpoint of this very run (its folder is named by the same key
    as the artifact) means an earlier run was stopped: it continues from there, as ``--resume`` would.
    """
    recipe = Recipe(config, data_dir, progress=progress, derived=derived)
    try:
        if not is_complete(recipe.path):
            log.info("training %s (%s)", derived.name, derived.identity["method"])
            recipe.fit(resume=(recipe.checkpoint_dir / CHECKPOINT).is_file())
        else:
            log.info("reusing %s", recipe.path)
    finally:
        recipe.cleanup()
    return load_model(recipe.path)


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
        self.stage = derived.stage if derived else _STAGE
        self.data_dir = Path(data_dir)
        self.data_manifest = verify_artifact(self.data_dir, ["train.safetensors", "val.safetensors"])
        if self.data_manifest.get("stage") != "data":
            raise ValueError(f"{self.data_dir} is a {self.data_manifest.get('stage')!r} artifact, not prepared data")
        self.dataset = self.data_manifest["dataset"]
        self.rank, self.world_size, local_rank = init_distributed(self.cfg.device)
        self.device = pick_device(self.cfg.device, local_rank)
        if self.cfg.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size={self.cfg.batch_size} does not divide over {self.world_size} processes: "
                "choose a multiple of --nproc-per-node"
            )
        self.bf16 = use_bf16(self.cfg.bf16, self.device)
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

    def fit(self, *, resume: bool) -> dict[str, Any]:
        """setup → run → finish: train and write the artifact; its manifest (empty on ranks other than 0)."""
        self.setup(resume=resume)
        self.run()
        return self.finish()

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
        self.optimizer = make_optimizer(model, cfg)
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
        with stop_signals(self._on_signal):
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
        opt_tensors, opt_meta = flatten_optimizer(self.optimizer.state_dict())
        tensors |= opt_tensors
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for r, state in enumerate(aug_states or []):
            tensors[f"rng.augment.{r}"] = state
        tensors["sums"] = self.sums.cpu()
        tensors |= {f"best.{k}": v for k, v in (self.best_weights or {}).items()}
        state = {
            "key": self.key,
            "epoch": self.epoch,
            "batch": self.batch,
            "history": self.history,
            "best": self.best,
            "optimizer": opt_meta,
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(self.checkpoint_dir / CHECKPOINT, tensors, state)
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
        tensors, state = read_checkpoint(path)
        if state.get("key") != self.key:
            raise ValueError(f"{path} belongs to another run (key {state.get('key')}), not {self.key}")
        unwrap(self.model).load_state_dict(
            {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        )
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"], self.device))
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

    def finish(self) -> dict[str, Any]:
        """Write the model artifact (rank 0) from the best epoch's weights, then remove the checkpoints; its manifest
        (empty on other ranks: they write nothing)."""
        if self.rank != 0:
            dist.barrier()
            return {}
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
        return manifest

    def cleanup(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
