"""The gradient noise scale of a model at fixed weights, measured offline, without training.

Offline and as precise as asked: batch pairs are drawn until the estimate's standard
error is small enough (`batchscope noise-scale`, a checkpoint someone hands you). The
loop's own, cheaper estimate while it trains is in trainers/noise_scale_in_loop.py.

B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training") is the batch size around which a larger batch stops buying proportionally
fewer steps. Here G is the mean per-example gradient over the dataset and Σ the
per-example gradient covariance, Σ = mean_i (g_i − G)(g_i − G)ᵀ.

`measure_noise_scale` draws big batches of `b_big` examples, takes the first `b_small`
of each as the small batch, and turns the two squared gradient norms into unbiased
estimates of |G|² and tr(Σ) (`batchscope.trainers.noise_scale_in_loop.two_batch_estimates`). As in appendix A of
the paper, numerator and denominator are averaged over batches separately and divided
once: the ratio of two means, not the mean of noisy ratios.

How many batch pairs are needed depends on the model and on the batch sizes: on linear
regression with B_simple ≈ 200, ±10% takes about 20 pairs with (b_small, b_big) =
(64, 1024), 200 with (16, 128) and 800 with (8, 64). So by default pairs are drawn
until the relative standard error of B_simple is below a target (10%), rather than a
fixed number of them.

Examples are drawn uniformly *with* replacement. Then a batch mean of B gradients has
E|G_B|² = |G|² + tr(Σ)/B exactly, so both estimates are unbiased for the dataset's own
G and Σ. Drawing without replacement (as training epochs do) would shrink the noise by
the finite-population factor (N − B)/(N − 1) and bias |G|² low by tr(Σ)/(N − 1).

The training loop measures the same quantity on the fly (`batchscope.trainers.noise_scale_in_loop.NoiseScaleWindow`);
this function is for a model someone hands you, e.g. a checkpoint.

Data that streams (a `DataTask`, `measure_data_noise_scale`) is measured the same way, with
its own loss (`step`, `model(**batch)` or `loss_fn`). From a `Dataset` the examples are drawn
with replacement exactly as from tensors (the same indices for the same seed), loaded through a
DataLoader. A factory of batches cannot be indexed: its big batches are consecutive batches of
its epochs, each a sample *without* replacement, so the finite-population bias above is
corrected as the loop corrects it (|G|² + tr(Σ)/N and tr(Σ)·(N − 1)/N), with N the recipe's
`num_train` where it gives one, else the examples of one epoch once an epoch has been read
whole; a stream longer than everything read is taken as infinite (its bias is at most
B_simple/N relative, N being more than was read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from batchscope.trainers.batches import loss_of, slice_batch, to_device
from batchscope.trainers.data import StreamBatches, default_workers
from batchscope.trainers.noise_scale_in_loop import grad_sq_norm, ratio_of_means, two_batch_estimates
from batchscope.trainers.task import DataTask, LossFn

# The mean loss of a batch (any structure) under `model`.
BatchLoss = Callable[[nn.Module, Any], torch.Tensor]
# `draw(k)`: the next k big batches, on the device.
Draw = Callable[[int], Iterator[Any]]


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """The measured noise scale and what went into it.

    `b_simple` is NaN when the averaged |G|² estimate is not positive: the gradient is
    then indistinguishable from noise at this sample size (typically near a minimum)
    and the noise scale is undefined. Standard errors are over the `n_batches`
    per-batch estimates; the one for `b_simple` uses the delta method for a ratio of
    means, SE(t̄/ḡ) ≈ sqrt(Var(t − R·g)/n)/|ḡ| with R = t̄/ḡ, which accounts for the
    correlation of the two estimates measured on the same batches.

    `precision_reached` says whether the relative standard error came down to the
    requested `rel_precision` (None when a fixed `n_batches` was asked for instead).
    `population` is the N of the finite-population correction (streams only; None: none made).
    """

    b_simple: float
    b_simple_stderr: float
    grad_sq: float
    grad_sq_stderr: float
    trace_sigma: float
    trace_sigma_stderr: float
    n_batches: int
    b_small: int
    b_big: int
    precision_reached: bool | None = None
    population: int | None = None

    @property
    def rel_stderr(self) -> float:
        """The standard error of `b_simple` relative to it (NaN when `b_simple` is)."""
        if self.b_simple == 0:
            return math.inf
        return self.b_simple_stderr / abs(self.b_simple)


# Pairs drawn between two looks at the standard error: each look reads the norms back
# to the host, so looking after every pair would sync the device once per pair.
_ROUND = 32


def measure_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    b_small: int,
    b_big: int,
    n_batches: int | None = None,
    rel_precision: float = 0.10,
    min_batches: int = 32,
    max_batches: int = 1024,
    seed: int = 0,
    device: torch.device | str | None = None,
    micro_batch_size: int | None = None,
) -> NoiseScaleEstimate:
    """Estimate B_simple = tr(Σ)/|G|² of `model` at its current weights on (x, y).

    By default (`n_batches=None`) batch pairs are drawn in rounds of 32 until the
    relative standard error of B_simple, `b_simple_stderr / b_simple`, is at most
    `rel_precision`, having drawn at least `min_batches`, or until `max_batches` pairs
    are drawn; `precision_reached` in the result says which. That gives B_simple to
    about ±10% (one standard error) wherever it can be had within 1024 pairs. Where
    |G|² is not distinguishable from zero (near a minimum) B_simple is NaN, the
    precision is never reached and all `max_batches` pairs are drawn.

    Stopping once the *estimated* error is small is a sequential test, and it biases
    the estimate a little: the run stops sooner when the noise happens to make the
    standard error look small (a high tr(Σ) estimate does). The bias is a small
    fraction of one standard error, because the standard error is looked at only once
    per round, and not before `min_batches` pairs, when its own estimate is still
    rough (±13% at 32 pairs). On linear regression it measured +1.2% ± 0.7% of
    B_simple (0.1 standard error) over 200 seeds, against a ±10% spread.
    Fix `n_batches` where no such bias is acceptable. Both draw the same pairs for
    the same seed: stopping after n pairs gives what `n_batches=n` gives.

    Args:
        model: evaluated as is; its weights, buffers and `.grad` are left unchanged and
            its train/eval mode is restored. It runs in eval mode, so BatchNorm uses its
            running statistics (per-example gradients must not depend on the rest of the
            batch, and the running statistics must not move) and dropout is off.
        loss_fn: `loss_fn(outputs, targets)` must return the *mean* over the batch of
            a per-example loss; B_simple is defined for that per-example loss.
        x, y: the dataset, on any device; batches are moved to `device`.
        b_small, b_big: the two batch sizes, 1 ≤ b_small < b_big ≤ len(x). A wider
            ratio gives a less noisy tr(Σ); a larger b_big a less noisy |G|².
        n_batches: a fixed number of (big, small) batch pairs to average, at least 2 so
            that a standard error can be given; None to draw until `rel_precision`.
        rel_precision: the target for `b_simple_stderr / b_simple`, above 0.
        min_batches: the fewest pairs drawn before stopping at the target, at least 2.
        max_batches: the most pairs drawn, at least `min_batches`.
        seed: seeds the choice of examples (a CPU generator; global RNGs are untouched).
        device: where the batches are evaluated; defaults to the model's device.
        micro_batch_size: evaluate the big batch in pieces of at most this many
            examples to bound memory; the result does not depend on it.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)=} and {len(y)=}.")
    if b_big > len(x):
        raise ValueError(f"b_big must not exceed the {len(x)} examples given, got {b_big=}.")
    dev = _device(model, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw(k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(k):
            idx = torch.randint(len(x), (b_big,), generator=gen).to(x.device)
            yield x[idx].to(dev), y[idx].to(dev)

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return loss_fn(m(batch[0]).float(), batch[1])

    return estimate_from_batches(
        model,
        loss,
        draw,
        b_small=b_small,
        b_big=b_big,
        n_batches=n_batches,
        rel_precision=rel_precision,
        min_batches=min_batches,
        max_batches=max_batches,
        micro_batch_size=micro_batch_size,
    )


def estimate_from_batches(
    model: nn.Module,
    loss: BatchLoss,
    draw: Draw,
    *,
    b_small: int,
    b_big: int,
    n_batches: int | None = None,
    rel_precision: float = 0.10,
    min_batches: int = 32,
    max_batches: int = 1024,
    micro_batch_size: int | None = None,
    population: Callable[[], int | None] = lambda: None,
) -> NoiseScaleEstimate:
    """B_simple from big batches of `b_big` examples that `draw` gives, their first `b_small`
    the small batch (see `measure_noise_scale` for the stopping rule and the arguments).

    `population()` is read at each look: N for batches drawn without replacement from N
    examples (None: drawn with replacement, or N too large to matter).
    """
    if b_small < 1:
        raise ValueError(f"b_small must be at least 1, got {b_small=}.")
    if b_small >= b_big:
        raise ValueError(f"b_small must be smaller than b_big, got {b_small=} and {b_big=}.")
    if n_batches is not None and n_batches < 2:
        raise ValueError(f"n_batches must be at least 2, got {n_batches=}.")
    if not rel_precision > 0:  # also rejects NaN
        raise ValueError(f"rel_precision must be positive, got {rel_precision=}.")
    if min_batches < 2:
        raise ValueError(f"min_batches must be at least 2, got {min_batches=}.")
    if max_batches < min_batches:
        raise ValueError(f"max_batches must be at least min_batches, got {max_batches=} and {min_batches=}.")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size=}.")
    params = _params(model)
    chunk = micro_batch_size or b_big
    # The rest of the big batch after its first b_small examples, in pieces.
    rest = [(lo, min(lo + chunk, b_big)) for lo in range(b_small, b_big, chunk)]
    # How many pairs have been drawn at each look at the standard error.
    looks = [n_batches] if n_batches is not None else [*range(min_batches, max_batches, _ROUND), max_batches]

    saved_grads = [p.grad for p in params]
    was_training = model.training
    model.eval()
    g_small_sq = torch.empty(0, dtype=torch.float64)
    g_big_sq = torch.empty(0, dtype=torch.float64)
    try:
        with torch.enable_grad():
            for drawn in looks:
                small_sqs: list[torch.Tensor] = []
                big_sqs: list[torch.Tensor] = []
                for batch in draw(drawn - len(g_small_sq)):
                    small_sq, big_sq = _pair_norms(model, loss, params, batch, b_small, b_big, rest)
                    small_sqs.append(small_sq)
                    big_sqs.append(big_sq)
                # Host sync, once per round: the round's per-batch norms, in fp64 for the statistics.
                g_small_sq = torch.cat([g_small_sq, torch.stack(small_sqs).double().cpu()])
                g_big_sq = torch.cat([g_big_sq, torch.stack(big_sqs).double().cpu()])
                grad_sq, trace = two_batch_estimates(g_small_sq, g_big_sq, b_small, b_big)
                assert isinstance(grad_sq, torch.Tensor) and isinstance(trace, torch.Tensor)
                n = population()
                if n is not None and b_big < n:  # without replacement: the loop's correction (module docstring)
                    grad_sq, trace = grad_sq + trace / n, trace * ((n - 1) / n)
                estimate = replace(_summarize(grad_sq, trace, b_small, b_big), population=n)
                if estimate.rel_stderr <= rel_precision:  # False while B_simple is NaN
                    break
    finally:
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        model.train(was_training)

    if n_batches is not None:
        return estimate
    return replace(estimate, precision_reached=estimate.rel_stderr <= rel_precision)


def default_batch_sizes(num_examples: int, b_small: int | None = None, b_big: int | None = None) -> tuple[int, int]:
    """(b_small, b_big) with those not given filled in: b_big = 512 (at most `num_examples`),
    b_small = b_big / 8. The defaults of `batchscope noise-scale` and `batchscope.noise_scale`:
    a wide ratio and a large b_big make both estimates less noisy (fewer pairs for ±10%), and
    512 examples a pair stay cheap for small models."""
    big = b_big if b_big is not None else min(512, num_examples)
    small = b_small if b_small is not None else max(1, big // 8)
    return small, big


def _pair_norms(
    model: nn.Module,
    loss: BatchLoss,
    params: list[nn.Parameter],
    batch: Any,
    b_small: int,
    b_big: int,
    rest: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """|G_small|² of the first b_small examples and |G_big|² of the whole batch, on the device."""
    for p in params:
        p.grad = None
    loss(model, slice_batch(batch, 0, b_small)).backward()
    small_sq = grad_sq_norm(params)
    # Re-weight the small-batch mean so that, with the rest added, .grad is the mean over
    # the whole big batch: the small batch is nested in the big one.
    for p in params:
        if p.grad is not None:
            p.grad.mul_(b_small / b_big)
    for lo, hi in rest:
        (loss(model, slice_batch(batch, lo, hi)) * ((hi - lo) / b_big)).backward()
    return small_sq, grad_sq_norm(params)


def _params(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter that requires a gradient.")
    return params


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else _params(model)[0].device


# ---- data that streams: a DataTask ---------------------------------------------------------


def measure_data_noise_scale(
    task: DataTask,
    *,
    b_small: int,
    b_big: int,
    n_batches: int | None = None,
    rel_precision: float = 0.10,
    min_batches: int = 32,
    max_batches: int = 1024,
    seed: int = 0,
    device: torch.device | str | None = None,
    micro_batch_size: int | None = None,
    num_train: int | None = None,
) -> NoiseScaleEstimate:
    """B_simple of `task.model` at its current weights on the task's training data (module docstring).

    As `measure_noise_scale`, with the task's own loss. `num_train` is the size of a stream
    (the recipe's `Recipe.num_train`), for the finite-population correction; unused for a
    `Dataset`, which is drawn with replacement. A stream whose epoch holds no batch of `b_big`
    raises `trainers.data.EmptyEpochError`.
    """
    dev = _device(task.model, device)
    draw: Draw
    population: Callable[[], int | None]
    if task.streams:
        source = _StreamDraw(StreamBatches(task.train, b_big, seed, slice(None), dev), num_train)  # type: ignore[arg-type]
        draw, population = source.draw, source.population
    else:
        dataset: Dataset[Any] = task.train  # type: ignore[assignment]
        if b_big > len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"b_big must not exceed the {len(dataset)} training examples, got {b_big=}.")  # type: ignore[arg-type]
        draw, population = _dataset_draw(task, dataset, b_big, seed, dev), lambda: None

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        return loss_of(model, batch, task.step, task.loss_fn)

    return estimate_from_batches(
        task.model,
        loss,
        draw,
        b_small=b_small,
        b_big=b_big,
        n_batches=n_batches,
        rel_precision=rel_precision,
        min_batches=min_batches,
        max_batches=max_batches,
        micro_batch_size=micro_batch_size,
        population=population,
    )


def _dataset_draw(task: DataTask, dataset: Dataset[Any], b_big: int, seed: int, device: torch.device) -> Draw:
    """Big batches of examples drawn with replacement, the indices `measure_noise_scale` draws
    for the same seed, through one DataLoader (its workers decode ahead of the measurement)."""
    workers = task.num_workers if task.num_workers is not None else default_workers(device)
    pin = device.type == "cuda"
    loader = DataLoader(
        dataset,
        batch_sampler=_WithReplacement(len(dataset), b_big, seed),  # type: ignore[arg-type]
        collate_fn=task.collate_fn,
        num_workers=workers,
        pin_memory=pin,
    )
    batches: Iterator[Any] | None = None

    def draw(k: int) -> Iterator[Any]:
        nonlocal batches
        batches = iter(loader) if batches is None else batches  # opened at the first pair, kept to the end
        for _ in range(k):
            yield to_device(next(batches), device, non_blocking=pin)

    return draw


class _WithReplacement:
    """An endless batch sampler: `b_big` indices of `n` at a time, uniform with replacement."""

    def __init__(self, n: int, b_big: int, seed: int) -> None:
        self.n, self.b_big, self.seed = n, b_big, seed

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        while True:
            yield torch.randint(self.n, (self.b_big,), generator=gen).tolist()


class _StreamDraw:
    """Consecutive big batches of a factory's epochs; the epoch's size once one has been read whole."""

    def __init__(self, batches: StreamBatches, num_train: int | None) -> None:
        self.batches, self.num_train = batches, num_train
        self.first_epoch = 0  # batches read from epoch 0

    def draw(self, k: int) -> Iterator[Any]:
        for _ in range(k):
            batch = self.batches.next()
            if self.batches.epoch == 0:
                self.first_epoch += 1
            yield batch

    def population(self) -> int | None:
        if self.num_train is not None:
            return self.num_train
        if self.batches.epoch == 0:
            return None  # longer than everything read so far
        # Full batches only: N is this, or up to b_big − 1 more (dropped as a partial batch).
        return self.first_epoch * self.batches.batch_size


def _summarize(grad_sq: torch.Tensor, trace: torch.Tensor, b_small: int, b_big: int) -> NoiseScaleEstimate:
    """Ratio of the means of the per-batch estimates, with delta-method standard errors."""
    n = len(grad_sq)
    g_mean, t_mean = float(grad_sq.mean()), float(trace.mean())
    g_se = float(grad_sq.std(correction=1)) / math.sqrt(n)
    t_se = float(trace.std(correction=1)) / math.sqrt(n)
    ratio, ratio_se = ratio_of_means(grad_sq.tolist(), trace.tolist())
    return NoiseScaleEstimate(
        b_simple=ratio,
        b_simple_stderr=ratio_se,
        grad_sq=g_mean,
        grad_sq_stderr=g_se,
        trace_sigma=t_mean,
        trace_sigma_stderr=t_se,
        n_batches=n,
        b_small=b_small,
        b_big=b_big,
    )
