"""The report's charts, everything against batch size: the registry and the rendering.

One function per chart, in a module per family (charts_scaling, charts_lr, charts_cost,
charts_search); each draws a labelled "not enough data" panel for whatever is missing
instead of failing."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure

from batchscope.analysis import style
from batchscope.analysis._fork import fork_map
from batchscope.analysis.analyze import SweepAnalysis
from batchscope.analysis.charts_cost import cost, generalization, throughput_latency
from batchscope.analysis.charts_lr import lr_batch
from batchscope.analysis.charts_params import params_chart, searched_params
from batchscope.analysis.charts_scaling import b_crit_progress, convergence, noise_scale, steps_to_target
from batchscope.analysis.charts_search import comparison, optuna_view
from batchscope.analysis.load import SweepData
from batchscope.analysis.style import BatchColors, ImageFormat


@dataclass(frozen=True)
class Chart:
    name: str  # file stem, also the HTML anchor
    title: str
    caption: str
    image: bytes
    image_format: ImageFormat

    @property
    def mime(self) -> str:
        return style.MIME[self.image_format]


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    caption: str
    draw: Callable[[SweepData, SweepAnalysis, BatchColors], Figure]
    # Drawn only when this holds (charts of optional data, e.g. inference throughput).
    when: Callable[[SweepData], bool] | None = None
    # The batch-size colour legend in the header; off for a chart that does not colour by batch size.
    batch_legend: bool = True


# --- registry ----------------------------------------------------------------------------------

CHARTS: tuple[_Spec, ...] = (
    _Spec(
        "convergence",
        "Convergence",
        "Validation (top) and training (bottom) loss against optimizer steps, examples seen and "
        "wall time; one line per batch size at its best learning rate (by the objective). "
        "Line: mean over seeds; band: min–max over seeds.",
        convergence,
    ),
    _Spec(
        "steps-to-target",
        "Steps and examples to target",
        "Per batch size, the learning rate that reached the target in the fewest steps (small "
        "dots: seeds; steps interpolated between the evaluations around the crossing). Dotted: "
        "perfect scaling (slope −1 for steps, flat for examples). Red: "
        "S(B) = S_min(1 + B_crit/B) and E(B) = E_min(1 + B/B_crit) fitted together "
        "(McCandlish et al. 2018), with B_crit and its 95% bootstrap interval.",
        steps_to_target,
    ),
    _Spec(
        "b-crit-progress",
        "B_crit against compute",
        "B_crit and its 95% bootstrap interval refitted as in the steps-to-target chart to the trials completed "
        "so far (a quarter of them to all; numbers: trials completed), against the examples their runs processed; "
        "band: the final interval.",
        b_crit_progress,
        batch_legend=False,
    ),
    _Spec(
        "noise-scale",
        "Gradient noise scale",
        "B_simple = tr(Σ)/|G|² at the best learning rate of each batch size, over consecutive "
        "windows of training steps (left) and against validation loss at each window's end (right): "
        "the ratio of the mean |G|² and tr Σ of every measurement in the window (negative ones "
        "included), band and bars its 95% interval (Fieller's; ▲: only a lower bound, where the mean |G|² "
        "cannot be told from 0). Red: the B_crit fitted from steps to target, "
        "which McCandlish et al. predict to be close to the noise scale.",
        noise_scale,
    ),
    _Spec(
        "lr-batch",
        "Learning rate × batch size",
        "Left: best objective per cell (learning rates binned when not on a grid; ★ best per batch "
        "size, ○ completed without reaching the target, × diverged, out of memory or failed, – pruned). "
        "Right: per batch size the lr that reached the target in the fewest steps (where 3 batch sizes "
        "reached it; else the best by the objective; the effective lr when a scaling rule is set; "
        "open rings: the best is at the edge of what was tried), McCandlish et al.'s law "
        "ε_max/(1 + B_*/B) with its knee B_* and 95% interval, and one power law for comparison.",
        lr_batch,
    ),
    _Spec(
        "params",
        "Other searched hyperparameters",
        "The hyperparameters searched besides batch size and learning rate (search.params): per batch size "
        "the value of its best trial by the objective (large dots; grey: every completed trial). Where a "
        "setting was scaled with the batch size (scale_with_batch), squares show the value the optimizer "
        "used; the dots are the sampled value at the reference batch.",
        params_chart,
        when=lambda sweep: bool(searched_params(sweep)),
    ),
    _Spec(
        "generalization",
        "Generalization",
        "Final generalization gap and sharpness (top Hessian eigenvalue) against batch size: "
        "every run, and the mean ± sd at the best learning rate.",
        generalization,
    ),
    _Spec(
        "cost",
        "Cost",
        "Throughput (median per run) and peak memory against batch size, and the time to reach "
        "the target at the fastest learning rate of each batch size.",
        cost,
    ),
    _Spec(
        "optuna",
        "Optuna's view",
        "Objective of each completed trial in order (colour: batch size) with the best so far, "
        "and fANOVA parameter importances.",
        optuna_view,
    ),
    _Spec(
        "inference",
        "Inference throughput",
        "From `batchscope throughput`: examples per second against latency per forward pass at each "
        "batch size (point: median, bar: to the 95th percentile). Larger batches buy throughput with latency.",
        throughput_latency,
        when=lambda sweep: not sweep.throughput.dropna(subset=["samples_per_s"]).empty,
    ),
)


def _error_figure(title: str, error: Exception) -> Figure:
    fig, axes = style.figure(1)
    style.empty_panel(axes[0], title, f"This chart could not be drawn:\n{type(error).__name__}: {error}"[:300])
    return fig


def render_charts(
    sweep: SweepData,
    result: SweepAnalysis,
    colors: BatchColors,
    *,
    image_format: ImageFormat = "png",
    strict: bool = False,
) -> list[Chart]:
    """Every chart of one study. With strict=False a chart that raises becomes a panel saying
    so (one bad chart should not cost the whole report); tests use strict=True."""
    # Charts colour by batch size; one legend per figure, in its header.
    legend = colors.legend_handles(sweep.trials["batch_size"].dropna())

    def render(spec: _Spec) -> Chart:
        with style.rc_context():  # the report's look, for drawing and saving alike
            try:
                fig = spec.draw(sweep, result, colors)
            except Exception as error:
                if strict:
                    raise
                warnings.warn(f"chart {spec.name!r} failed: {error!r}", stacklevel=2)
                fig = _error_figure(spec.title, error)
            handles = legend if spec.batch_legend else None
            image = style.to_bytes(fig, image_format, title=spec.title, legend_handles=handles)
        return Chart(spec.name, spec.title, spec.caption, image, image_format)

    # Each chart drawn in whichever process is free (see _fork): half the wall time on 2 cores.
    return fork_map(render, [spec for spec in CHARTS if spec.when is None or spec.when(sweep)])


def render_comparison(studies: Sequence[tuple[str, SweepAnalysis]], *, image_format: ImageFormat = "png") -> Chart:
    with style.rc_context():
        image = style.to_bytes(comparison(studies), image_format, title="Comparison")
    return Chart(
        "comparison",
        "Comparison",
        "Steps and time to target at the fastest learning rate of each batch size, one line per study.",
        image,
        image_format,
    )
