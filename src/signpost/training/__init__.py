"""training: the engine that turns prepared data into a trained model artifact, resumable and distributed.

The stages drive it and it imports no stage: the train stage (``signpost.stages.train``) trains the experiment's
model with a ``Recipe``; the optimize stage fine-tunes pruned models and trains students with ``train_derived``.

One recipe, read top to bottom: ``Recipe.__init__`` checks the config and the data, ``setup`` builds the model,
optimizer and loaders, ``run`` trains with validation every epoch, and ``finish`` writes the artifact (``fit``
runs the three in order, for both stages). The same code runs in one process or under ``torchrun --nproc-per-node
N`` (DistributedDataParallel: gloo on CPU, NCCL on GPU), where rank 0 alone writes files.

Checkpoints hold everything needed to continue bit for bit on the same machine: weights, the best epoch's weights,
optimizer state, the step within the epoch, the augmentation generator of every rank, the global RNG, the running
sums of the epoch and the history. They are written at the end of every epoch and when SIGINT or SIGTERM arrives;
``resume=True`` continues from the last one, also after a SIGKILL. A checkpoint is one file (the tensors in
safetensors, the rest as JSON in its header, with a SHA-256 of both) that replaces the previous one only by a
rename, so a kill at any moment leaves one whole checkpoint, never parts of two. Nothing is pickled.

The package, one job a module: ``recipe`` (the recipe and ``train_derived``, the loop), ``checkpoint`` (the
checkpoint file), ``schedule`` (epochs, steps and the optimizer) and ``distributed`` (the process group, the device,
bf16 and the stop signals). The stages import from here.
"""

from signpost.training.checkpoint import CHECKPOINT
from signpost.training.recipe import Derived, EpochCallback, Recipe, TrainingInterrupted, train_derived
from signpost.training.schedule import Schedule, plan_schedule

__all__ = [
    "CHECKPOINT",
    "Derived",
    "EpochCallback",
    "Recipe",
    "Schedule",
    "TrainingInterrupted",
    "plan_schedule",
    "train_derived",
]
