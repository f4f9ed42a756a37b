"""`auto` batch sizes in configs, resolved once per study with AutoBatch and remembered.

`search.batch_size: {low: 16, high: auto}` caps the search space at the largest
batch that fits; `train.micro_batch_size: auto` splits only the batches that do
not fit. The measurement is stored on the study, so a resumed sweep keeps the
same search space instead of measuring again on a busier machine.
"""

from __future__ import annotations

from typing import Any

from batchscope.sweeps.config import BatchRange, LrRange, SweepConfig
from batchscope.sweeps.errors import UserError
from batchscope.sweeps.specs import make_spec

ATTR = "batchscope.autobatch"
# Training also evaluates and measures the noise scale: leave some headroom.
SWEEP_FRACTION = 0.8


def needs_autobatch(cfg: SweepConfig) -> bool:
    bs = cfg.search.batch_size
    return (isinstance(bs, BatchRange) and bs.high == "auto") or cfg.train.micro_batch_size == "auto"


def measure(cfg: SweepConfig, *, fraction: float = SWEEP_FRACTION, budget_mb: float | None = None) -> Any:
    """Run AutoBatch for the config's model, precision and device."""
    from batchscope.trainers.autobatch import AutoBatchError, find_batch_size

    spec = make_spec(cfg, 1, probe_lr(cfg), cfg.train.seeds[0])
    try:
        return find_batch_size(spec, fraction=fraction, budget_mb=budget_mb)
    except AutoBatchError as exc:
        raise UserError(f"AutoBatch: {exc}") from None
    except ValueError as exc:
        raise UserError(f"AutoBatch: {exc}") from None


def resolve(
    cfg: SweepConfig, remembered: dict[str, Any] | None
) -> tuple[SweepConfig, int | None, dict[str, Any] | None]:
    """Replace `high: auto` by the measured batch size; return (config, max micro-batch, record to remember)."""
    if not needs_autobatch(cfg):
        return cfg, None, None
    record = remembered
    if record is None:
        result = measure(cfg)
        record = {"batch_size": int(result.batch_size), "method": result.method}
    fits = int(record["batch_size"])
    bs = cfg.search.batch_size
    if isinstance(bs, BatchRange) and bs.high == "auto":
        if fits < bs.low:
            raise UserError(
                f"search.batch_size: AutoBatch found that at most {fits} examples fit in memory, "
                f"below low={bs.low}; lower `low` or use train.micro_batch_size: auto"
            )
        search = cfg.search.model_copy(update={"batch_size": BatchRange(low=bs.low, high=fits)})
        cfg = cfg.model_copy(update={"search": search})
    max_micro = fits if cfg.train.micro_batch_size == "auto" else None
    return cfg, max_micro, record


def probe_lr(cfg: SweepConfig) -> float:
    """Any valid lr: memory does not depend on it."""
    lrs = cfg.search.lr_choices()
    if lrs:
        return float(lrs[0])
    assert isinstance(cfg.search.lr, LrRange)
    return float(cfg.search.lr.low)
