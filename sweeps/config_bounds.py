"""Bounds on what a sweep config can mean, and the checks that need more than one field.

Past these bounds a number is a typo, and it would run until killed (or take the machine's
memory) instead of being refused in one line. The schema (sweeps.config) applies them; the
CLI holds its own arguments to them (`--n-trials`, `--batch-size`, `--seed`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchscope.sweeps.errors import UserError
from batchscope.trainers.recipes import get_recipe

if TYPE_CHECKING:
    from batchscope.sweeps.config import SweepConfig, TrainConfig, TrainerConfig

# numpy takes seeds in [0, 2**32 - 1], and the recipes seed numpy with them.
SEED_MAX = 2**32 - 1
# Examples in one step: 2**8 times the largest batches of Shallue et al. 2019 (2**16).
MAX_BATCH = 2**24
# Steps in one run: a thousand times a long language-model pre-training (about 10**6 steps).
MAX_STEPS = 10**9
# Epochs in one run: ten times the longest runs on tiny data (grokking studies reach about 10**5).
MAX_EPOCHS = 10**6
# A batch may span several epochs (trainers.data.DeviceBatcher), so a search space may reach past
# the training set (a power-of-two grid overshoots it, memory probes go further); past this many
# copies of every example in each step the batch size no longer means anything.
MAX_BATCH_PER_TRAIN_SET = 1024
# Trials in one study: a million real training runs of a second or more each is weeks of compute.
MAX_TRIALS = 10**6


# Recipes whose training-set size follows from their options alone. cifar10 and charlm count
# their data files (their modules import torch), which validation does not do: their batches
# are bounded by MAX_BATCH only.
_SIZE_FROM_OPTIONS = frozenset({"mnist1d", "digits"})


def train_size_without_torch(trainer: TrainerConfig) -> int | None:
    """The training-set size where the options give it without reading data, else None."""
    recipe = get_recipe(trainer.recipe)
    if trainer.recipe not in _SIZE_FROM_OPTIONS or recipe.num_train is None:
        return None
    return int(recipe.num_train(recipe.options.model_validate(trainer.options)))


def batch_problem(batch_size: int, num_train: int | None) -> str | None:
    if batch_size > MAX_BATCH:
        return f"a batch size must be at most 2**24 = {MAX_BATCH:,}, got {batch_size:,}"
    if num_train is not None and batch_size > MAX_BATCH_PER_TRAIN_SET * num_train:
        return (
            f"a batch of {batch_size:,} repeats each of the {num_train:,} training examples more than "
            f"{MAX_BATCH_PER_TRAIN_SET} times per step; at most {MAX_BATCH_PER_TRAIN_SET * num_train:,} here"
        )
    return None


def budget_problem(train: TrainConfig, batch_size: int, num_train: int | None) -> str | None:
    """Whether a sample or epoch budget means more than MAX_STEPS steps at this batch size."""
    if train.max_samples is not None:
        field, value = "max_samples", f"{train.max_samples:,}"
    elif train.max_epochs is not None and num_train is not None:
        field, value = "max_epochs", f"{train.max_epochs:g}"
    else:
        return None  # max_steps is bounded by its own field; epochs of unknown data cannot be counted
    steps = train.steps_for(batch_size, num_train or 1)
    if steps <= MAX_STEPS:
        return None
    return (
        f"train.{field}: {value} is {steps:.3g} steps at batch size {batch_size}; "
        f"a run may take at most {MAX_STEPS:,} steps: lower train.{field}"
    )


def check_batch_size(cfg: SweepConfig, batch_size: int, source: str) -> None:
    """A batch size given outside the config (`batchscope train --batch-size`), held to the config's bounds."""
    num_train = train_size_without_torch(cfg.trainer)
    problem = batch_problem(batch_size, num_train) or budget_problem(cfg.train, batch_size, num_train)
    if problem:
        raise UserError(f"{source} {batch_size}: {problem}")
