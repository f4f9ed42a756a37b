"""`batchscope.noise_scale` and `batchscope.autobatch`: measurements that need no sweep."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batchscope._common import ConfigLike, Overrides, read_config, user_errors

if TYPE_CHECKING:
    import torch
    from torch import nn

    from batchscope.trainers.autobatch import AutoBatchResult
    from batchscope.trainers.noise_scale_offline import NoiseScaleEstimate
    from batchscope.trainers.task import LossFn


def noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    b_small: int | None = None,
    b_big: int | None = None,
    n_batches: int | None = None,
    rel_precision: float = 0.10,
    max_batches: int = 1024,
    seed: int = 0,
    device: torch.device | str | None = None,
    micro_batch_size: int | None = None,
) -> NoiseScaleEstimate:
    """The gradient noise scale B_simple = tr(Σ)/|G|² of `model` at its current weights on (x, y).

    B_simple (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training") is the
    batch size around which a larger batch stops buying proportionally fewer steps. It is
    estimated from the squared gradient norms of pairs of batches of `b_small` and `b_big`
    examples, drawn until its standard error is `rel_precision` of it (or `n_batches` pairs):
    what `batchscope noise-scale` measures, for any model. The model's weights, gradients and
    train/eval mode are left as they were.

    Args:
        model: any module; evaluated in eval mode (BatchNorm on its running statistics).
        loss_fn: ``loss_fn(outputs, targets)`` returning the *mean* loss over the batch.
        x, y: the examples and their targets.
        b_small, b_big: the two batch sizes (default: 512 or the dataset, and b_big / 8).
        n_batches: a fixed number of batch pairs instead of drawing until `rel_precision`.
        rel_precision: the target standard error of B_simple relative to it.
        max_batches: the most batch pairs drawn for `rel_precision`.
        seed: the choice of examples (global random states are untouched).
        device: where batches are evaluated (default: the model's).
        micro_batch_size: evaluate big batches in pieces of this many examples (less memory).

    Returns:
        `b_simple` with its standard error (`b_simple_stderr`), the |G|² and tr(Σ) estimates,
        and `precision_reached`. `b_simple` is NaN where |G|² is indistinguishable from zero.

    Raises:
        ValueError: a batch size, count or precision out of range (the message names it).
    """
    from batchscope.trainers.noise_scale_offline import default_batch_sizes, measure_noise_scale

    small, big = default_batch_sizes(len(x), b_small, b_big)
    return measure_noise_scale(
        model,
        loss_fn,
        x,
        y,
        b_small=small,
        b_big=big,
        n_batches=n_batches,
        rel_precision=rel_precision,
        max_batches=max_batches,
        seed=seed,
        device=device,
        micro_batch_size=micro_batch_size,
    )


@user_errors
def autobatch(
    config: ConfigLike,
    *,
    overrides: Overrides = None,
    fraction: float = 0.9,
    budget_mb: float | None = None,
    max_batch: int = 65536,
) -> AutoBatchResult:
    """The largest batch size whose training step on the config's model fits in memory,
    measured on real training steps and verified: what `batchscope autobatch` finds.

    Args:
        config, overrides: the sweep config (a YAML path or a dict) and changes to it, as for
            `batchscope.sweep`; its trainer, model, optimizer, precision and device are probed.
        fraction: the share of free memory a training process may peak at.
        budget_mb: a peak-memory budget in MB instead of `fraction`.
        max_batch: the largest batch size considered.

    Returns:
        `batch_size`, every probe (`probes`, `table()`), the fitted memory line and `method`,
        a sentence saying what was measured.

    Raises:
        UserError: a bad config or argument, or no batch that fits (one line saying what was measured).
    """
    from batchscope.sweeps.commands_measure import find_config_batch_size

    cfg = read_config(config, overrides)
    return find_config_batch_size(cfg, fraction=fraction, budget_mb=budget_mb, max_batch=max_batch)
