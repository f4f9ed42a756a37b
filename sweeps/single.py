"""`batchscope train`: one tracked training run, without Optuna."""

from __future__ import annotations

from typing import Any

from batchscope.sweeps import memcap
from batchscope.sweeps.config import SweepConfig
from batchscope.sweeps.locations import redact
from batchscope.sweeps.owners import worker_id
from batchscope.sweeps.specs import make_spec, memory_cap, run_params
from batchscope.sweeps.store_setup import check_tracking, quiet_libraries, resolve
from batchscope.sweeps.tracking import REASON, ROLE, RUN_STATUS, SEED, STATUS, WORKER, MlflowSink, Tracker
from batchscope.trainers.loop import train
from batchscope.trainers.spec import TrainResult


def train_once(
    cfg: SweepConfig, batch_size: int, lr: float, seed: int, *, max_micro: int | None = None
) -> tuple[TrainResult, str]:
    quiet_libraries()
    stores = resolve(cfg.storage, cfg.tracking_uri)
    check_tracking(stores)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    exp = tracker.experiment_id(cfg.study)
    spec = make_spec(cfg, batch_size, lr, seed, max_micro=max_micro)
    run = tracker.client.create_run(
        exp, run_name=f"train bs={batch_size} lr={lr:.3g}", tags={ROLE: "train", SEED: str(seed), WORKER: worker_id()}
    )
    run_id = run.info.run_id
    cap = memory_cap(cfg, 1)
    tracker.log_params(run_id, run_params(spec, cfg) | {"memory_limit_mb": cap})
    sink = MlflowSink(tracker.client, run_id)
    try:
        memcap.apply_cap(cap, memcap.vm_size_kb())  # an absurd batch ends as `oom`, not the machine
        try:
            result = train(spec, sink)
        finally:
            memcap.apply_cap(None, None)
    except BaseException as exc:
        try:
            sink.close(timeout=30)
        finally:
            tracker.end(
                run_id,
                "FAILED" if isinstance(exc, Exception) else "KILLED",
                tags={STATUS: "failed", REASON: redact(str(exc))[:500]},
            )
        raise
    sink.close()
    if result.final:
        tracker.log_final(run_id, result.steps, result.final)
    tracker.end(run_id, RUN_STATUS[result.status], tags={STATUS: result.status, REASON: result.reason})
    return result, run_id


def resolve_weights(cfg: SweepConfig, checkpoint: str | None) -> tuple[str | None, str | None]:
    """A weights file from a path, or from an MLflow run's `weights/model.pt`; (path, run id)."""
    import os

    from batchscope.sweeps.errors import UserError

    if checkpoint is None:
        return None, None
    if os.path.isfile(checkpoint):
        return checkpoint, None
    quiet_libraries()
    stores = resolve(cfg.storage, cfg.tracking_uri)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    try:
        path = tracker.client.download_artifacts(checkpoint, "weights/model.pt")
    except Exception as exc:
        raise UserError(
            f"--checkpoint {checkpoint!r} is neither a file nor an MLflow run with weights/model.pt "
            f"({str(exc).splitlines()[0][:200]}); kept trials log their weights (train.checkpoint.keep)"
        ) from None
    return path, checkpoint


def log_throughput(cfg: SweepConfig, results: list[Any], source_run: str | None) -> str:
    """One MLflow run (role `throughput`) with samples/s and latencies, step = batch size."""
    quiet_libraries()
    stores = resolve(cfg.storage, cfg.tracking_uri)
    check_tracking(stores)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    exp = tracker.experiment_id(cfg.study)
    tags = {ROLE: "throughput"}
    if source_run:
        tags["batchscope.weights_run"] = source_run
    run = tracker.client.create_run(exp, run_name="inference throughput", tags=tags)
    ok = [r for r in results if r.status == "ok"]
    params = {"model": cfg.trainer.model, "trainer": cfg.trainer.recipe}
    if results:
        params.update(device=results[0].device, precision=results[0].precision)
    tracker.log_params(run.info.run_id, params)
    for r in ok:
        tracker.log_final(
            run.info.run_id,
            r.batch_size,
            {
                "infer/samples_per_s": r.samples_per_s,
                "infer/latency_p50_ms": r.latency_p50_ms,
                "infer/latency_p95_ms": r.latency_p95_ms,
            },
        )
    oom = [str(r.batch_size) for r in results if r.status != "ok"]
    tracker.end(run.info.run_id, "FINISHED", tags={"batchscope.oom_batch_sizes": ",".join(oom)} if oom else None)
    return str(run.info.run_id)
