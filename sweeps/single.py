"""`batchscope train`: one tracked training run, without Optuna."""

from __future__ import annotations

from sweeps.config import SweepConfig
from sweeps.runner import make_spec, run_params
from sweeps.stores import check_tracking, quiet_libraries, resolve
from sweeps.tracking import REASON, ROLE, RUN_STATUS, SEED, STATUS, MlflowSink, Tracker
from trainers.loop import train
from trainers.spec import TrainResult


def train_once(cfg: SweepConfig, batch_size: int, lr: float, seed: int) -> tuple[TrainResult, str]:
    quiet_libraries()
    stores = resolve(cfg.storage, cfg.tracking_uri)
    check_tracking(stores)
    tracker = Tracker(stores.tracking_uri, stores.artifact_root)
    exp = tracker.experiment_id(cfg.study)
    spec = make_spec(cfg, batch_size, lr, seed)
    run = tracker.client.create_run(
        exp, run_name=f"train bs={batch_size} lr={lr:.3g}", tags={ROLE: "train", SEED: str(seed)}
    )
    run_id = run.info.run_id
    from sweeps.tracking import _params

    tracker.client.log_batch(run_id, params=_params(run_params(spec, cfg)))
    sink = MlflowSink(tracker.client, run_id)
    try:
        result = train(spec, sink)
    except BaseException as exc:
        try:
            sink.close(timeout=30)
        finally:
            tracker.end(
                run_id,
                "FAILED" if isinstance(exc, Exception) else "KILLED",
                tags={STATUS: "failed", REASON: str(exc)[:500]},
            )
        raise
    sink.close()
    if result.final:
        tracker.log_final(run_id, result.steps, result.final)
    tracker.end(run_id, RUN_STATUS[result.status], tags={STATUS: result.status, REASON: result.reason})
    return result, run_id
