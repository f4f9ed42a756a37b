"""The commands that measure the config's model outside a sweep: `autobatch`, `throughput`, `noise-scale`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from batchscope.sweeps.commands import err, load_config, out
from batchscope.sweeps.errors import UserError

if TYPE_CHECKING:
    from batchscope.sweeps.config import SweepConfig
    from batchscope.trainers.autobatch import AutoBatchResult


def cmd_autobatch(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # --fraction, --budget-mb, --max-batch: checked by the parser
    err.print("Probing real training steps at growing batch sizes…")
    result = find_config_batch_size(cfg, fraction=args.fraction, budget_mb=args.budget_mb, max_batch=args.max_batch)
    out.print(result.table())
    out.print()
    out.print(f"[bold]largest batch size that fits: {result.batch_size}[/]")
    out.print(escape(result.method))
    return 0


def find_config_batch_size(
    cfg: SweepConfig, *, fraction: float = 0.9, budget_mb: float | None = None, max_batch: int = 65536
) -> AutoBatchResult:
    """AutoBatch on the config's model and optimizer (what `batchscope autobatch` shows, and
    batchscope.autobatch returns); a search that cannot answer is a UserError of one line."""
    from batchscope.sweeps.memory import probe_lr
    from batchscope.sweeps.specs import make_spec
    from batchscope.trainers.autobatch import AutoBatchError, find_batch_size

    spec = make_spec(cfg, 1, probe_lr(cfg), cfg.train.seeds[0])
    try:
        return find_batch_size(spec, fraction=fraction, budget_mb=budget_mb, max_batch=max_batch)
    except (AutoBatchError, ValueError) as exc:
        raise UserError(f"AutoBatch: {exc}") from None


def cmd_throughput(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from batchscope.sweeps.config_bounds import MAX_BATCH

    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
        raise UserError(f"--batch-sizes must be integers from 1 to 2**24 = {MAX_BATCH:,}, got {args.batch_sizes!r}")
    from batchscope.sweeps.single import log_throughput, resolve_weights
    from batchscope.sweeps.specs import make_spec
    from batchscope.trainers.throughput import inference_table, measure_inference

    weights, source_run = resolve_weights(cfg, args.checkpoint)
    spec = make_spec(cfg, max(sizes), 1e-3, cfg.train.seeds[0])
    try:
        results = measure_inference(spec, sizes, iters=args.iters, weights=weights)
    except ValueError as exc:  # the recipe's own refusal (options, data): one line saying what to change
        raise UserError(str(exc)) from None
    out.print(inference_table(results))
    run_id = log_throughput(cfg, results, source_run)
    out.print(f"logged to MLflow run {run_id} (experiment {escape(cfg.study)})")
    return 0


def cmd_noise_scale(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    min_batches = 32  # (--batches, --precision and --seed are held to their ranges by the parser)
    if args.max_batches < min_batches:
        raise UserError(f"--max-batches must be at least {min_batches}, got {args.max_batches}")
    import torch

    from batchscope.trainers.device import resolve_device, seed_everything
    from batchscope.trainers.recipes import build_any_task

    seed = cfg.train.seeds[0] if args.seed is None else args.seed
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise UserError(f"device: {exc}") from None
    from batchscope.sweeps.single import resolve_weights

    # A weights file, or an MLflow run id whose weights/model.pt is fetched, as for `throughput`.
    weights, source_run = resolve_weights(cfg, args.checkpoint)
    seed_everything(seed)
    try:
        task = build_any_task(cfg.trainer.recipe, cfg.trainer.model, cfg.trainer.options, device)
    except ValueError as exc:  # the recipe's own refusal (options, data): one line saying what to change
        raise UserError(str(exc)) from None
    where = "initialization"
    if weights is not None:
        _load_weights(task.model, Path(weights), device, shown=args.checkpoint)
        where = f"checkpoint {args.checkpoint}" if source_run is None else f"the weights of MLflow run {source_run}"
    est = _estimate(task, cfg, args, seed=seed, min_batches=min_batches)
    out.print(f"Gradient noise scale of {cfg.trainer.recipe}/{cfg.trainer.model} at {escape(where)}")
    table = Table()
    table.add_column("quantity")
    table.add_column("estimate", justify="right")
    table.add_column("± std. error", justify="right")
    table.add_row("B_simple = tr(Σ)/|G|²", f"{est.b_simple:.4g}", f"{est.b_simple_stderr:.2g}")
    table.add_row("|G|²", f"{est.grad_sq:.4g}", f"{est.grad_sq_stderr:.2g}")
    table.add_row("tr(Σ)", f"{est.trace_sigma:.4g}", f"{est.trace_sigma_stderr:.2g}")
    out.print(table)
    target = f", target ±{100 * args.precision:g}%" if est.precision_reached is not None else ""
    out.print(
        f"B_simple = {est.b_simple:.4g} ± {est.b_simple_stderr:.2g} (±{est.rel_stderr:.1%}{target}) "
        f"from {est.n_batches} pairs of batches of {est.b_small} and {est.b_big} examples on {device} "
        f"(McCandlish et al. 2018); torch {torch.__version__}"
    )
    if est.population is not None:
        out.print(f"(batches of a stream, drawn without replacement: corrected for its {est.population} examples)")
    if est.b_simple != est.b_simple:  # NaN
        out.print("[yellow]|G|² is not distinguishable from zero here (near a minimum?); B_simple is undefined.[/]")
    if est.precision_reached is False:
        out.print(
            f"[yellow]The target precision ±{100 * args.precision:g}% was not reached within --max-batches "
            f"{args.max_batches} pairs: raise --max-batches, or use a larger --b-big.[/]"
        )
    return 0


def _estimate(task: Any, cfg: SweepConfig, args: argparse.Namespace, *, seed: int, min_batches: int) -> Any:
    """The offline noise scale on the training data of either form of task (trainers/noise_scale_offline.py)."""
    from batchscope.trainers.data import EmptyEpochError
    from batchscope.trainers.noise_scale_offline import (
        default_batch_sizes,
        measure_data_noise_scale,
        measure_noise_scale,
    )
    from batchscope.trainers.recipes import stated_num_train
    from batchscope.trainers.task import Task

    stream = not isinstance(task, Task) and task.streams
    # A stream's size is the recipe's to state (Recipe.num_train), or unknown.
    n = stated_num_train(cfg.trainer.recipe, cfg.trainer.options) if stream else task.num_train
    b_small, b_big = default_batch_sizes(n if n is not None else 512, args.b_small, args.b_big)
    if not 1 <= b_small < b_big <= (n if n is not None else b_big):
        most = f" ≤ {n} (the training set)" if n is not None else ""
        raise UserError(f"need 1 ≤ --b-small < --b-big{most}, got --b-small {b_small} and --b-big {b_big}")
    common = {
        "b_small": b_small,
        "b_big": b_big,
        "n_batches": args.batches,
        "rel_precision": args.precision,
        "min_batches": min_batches,
        "max_batches": args.max_batches,
        "seed": seed,
    }
    if isinstance(task, Task):
        return measure_noise_scale(task.model, task.loss_fn, task.train_x, task.train_y, **common)
    try:
        return measure_data_noise_scale(task, num_train=n if stream else None, **common)
    except EmptyEpochError:
        raise UserError(
            f"--b-big {b_big}: the training stream gives no batch of {b_big} examples in an epoch "
            "(it holds fewer); lower --b-big"
        ) from None
    except ValueError as exc:  # the recipe's batches or loss refused (ragged batches, a per-example loss)
        raise UserError(str(exc)) from None


def _load_weights(model: Any, path: Path, device: Any, *, shown: str) -> None:
    """Load the weights in `path` (what the user gave as `shown`: a file, or a run id) into `model`."""
    import torch

    if not path.is_file():
        raise UserError(f"--checkpoint {shown!r} is not a file")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise UserError(f"--checkpoint {shown!r} cannot be read as weights: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "objects" in state and "model" in state.get("objects", {}):
        state = state["objects"]["model"]  # a batchscope checkpoint
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(
            f"--checkpoint {shown!r} does not fit this config's model: {str(exc).splitlines()[0]}"
        ) from None
