"""`make demo`: sample data in, predictions and dbt tables out, a summary printed.

It drives the same jobs a data engineer launches from the UI, on the same
Dagster instance (``DAGSTER_HOME``), so the runs are there to inspect in
``make ui`` afterwards.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from dagster import AssetKey, DagsterInstance, execute_job, reconstructable

from ops.ml.attributes import declared_attributes
from ops.shards import STATUSES
from orchestration.environment import REPO_ROOT, data_dir, source_dir
from orchestration.recovery import recover_dead_runs
from synthetic import generate_departement

DEMO_DEPARTEMENTS = ("12", "2A")
STAGE_CROP = ["buildings", "ortho_mosaic", "chips"]
STAGE_PREDICT = ["predictions", "stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]


def enrich_job():
    from orchestration.definitions import defs

    return defs.resolve_job_def("enrich_departement")


def train_job():
    from orchestration.definitions import defs

    return defs.resolve_job_def("train_models")


def instance() -> DagsterInstance:
    """The local instance under ``DAGSTER_HOME``, its storage created by one process at a time.

    Dagster creates its SQLite tables on first use; two first runs on a fresh
    ``DAGSTER_HOME`` would both try, and one would crash on "table already
    exists". The instance's config is (re)copied, like ``make ui`` does, when
    the project's is newer. Dead runs' pool slots are given back before anything
    waits on them (``orchestration/recovery.py``).
    """
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".instance.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config, ours = home / "dagster.yaml", REPO_ROOT / "orchestration" / "instance" / "local.yaml"
        if not config.exists() or config.stat().st_mtime < ours.stat().st_mtime:
            shutil.copy(ours, config)
        inst = DagsterInstance.get()
        recover_dead_runs(inst)
    return inst


def run(
    job_fn,
    inst: DagsterInstance,
    *,
    partition: str | None = None,
    assets: list[str] | None = None,
    run_config: dict | None = None,
) -> dict:
    """Execute a job and return {asset: metadata} of its materializations; raise if it failed."""
    tags = {"dagster/partition": partition} if partition else {}
    # INFO on the console: progress lines and results, not every engine event.
    run_config = {**(run_config or {}), "loggers": {"console": {"config": {"log_level": "INFO"}}}}
    selection = [AssetKey(a) for a in assets] if assets else None
    with execute_job(
        reconstructable(job_fn), inst, tags=tags, asset_selection=selection, run_config=run_config
    ) as result:
        if not result.success:
            failures = [e.message for e in result.all_events if e.is_failure]
            raise SystemExit(f"run {result.run_id} failed ({partition or 'unpartitioned'}):\n" + "\n".join(failures))
        return {
            e.asset_key.to_user_string(): {
                k: v.value for k, v in e.step_materialization_data.materialization.metadata.items()
            }
            for e in result.get_asset_materialization_events()
        }


def summary(dep: str, crop: dict, pred: dict, seconds: float) -> str:
    from resources.warehouse import DuckDBWarehouse

    warehouse = DuckDBWarehouse(path=str(data_dir() / "warehouse.duckdb"))
    b = int(warehouse.query("select count(*) n from buildings where departement = ?", [dep]).n[0])
    rows = warehouse.query(
        """select model_name, model_version, task, buildings, predicted, n_ok, n_no_imagery, n_nodata,
                  n_invalid_geometry, n_error, coverage, label_distribution, mean_score, mean_value
           from departement_summary where departement = ? order by model_name, model_version""",
        [dep],
    )
    meta = pred["predictions"]
    lines = [f"département {dep}", f"  buildings      {b:,}"]
    for name, attr in declared_attributes().items():
        version = meta.get(f"{name}_model_version")
        cur = rows[(rows.model_name == name) & (rows.model_version == version)]
        if cur.empty:
            continue
        cur = cur.iloc[0]
        lines += [
            f"  {name:<14} {int(cur.predicted):,} rows from {name}@{version} ({cur.task})",
            "    statuses     " + ", ".join(f"{s} {int(cur['n_' + s]):,}" for s in STATUSES),
        ]
        if cur.task == "regression":
            lines.append(
                f"    values       mean {cur.mean_value:.1f} {attr.unit}, from {meta.get(f'{name}_value_range', '?')}"
                f"   (coverage {cur.coverage:.1%})"
            )
        else:
            lines.append(
                f"    labels       {cur.label_distribution}   (mean score {cur.mean_score:.3f}, coverage {cur.coverage:.1%})"
            )
        if f"{name}_area_m2" in meta:
            lines.append(f"    panel area   {meta[f'{name}_area_m2']:,.0f} m² of polygons in predictions.geometry")
    lines.append(
        f"  wall time      {seconds:.1f} s; chips {crop['chips']['chips_per_s']:,.0f}/s, "
        f"inference {meta['chips_per_s']:,.0f} chips/s (every model, batch {meta['batch_size']})"
    )
    return "\n".join(lines)


def model_lines(models) -> list[str]:
    """Each current model's version and held-out metrics, from its model card."""
    out = []
    for name in declared_attributes():
        try:
            card = models.card(name)
        except FileNotFoundError:
            out.append(f"{name}: declared, no model yet (train it: `make demo-train`, or its asset in the UI)")
            continue
        m = card.metrics
        if card.task == "segmentation":
            detail = f"panel IoU {m['iou']:.3f}, pixel macro-F1 {m['macro_f1']:.3f}"
        elif card.task == "regression":
            detail = (
                f"MAE {m['mae']:.2f} {card.unit} vs {m['baseline_mae']:.2f} predicting the mean, "
                f"RMSE {m['rmse']:.2f}, R² {m['r2']:.3f}"
            )
        else:
            detail = f"accuracy {m['accuracy']:.3f} vs chance {m['chance_accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}"
            if card.calibration:
                detail += f", ECE {card.calibration['ece_before']:.3f} → {card.calibration['ece_after']:.3f} calibrated"
        out.append(f"{name}@{card.version} ({card.task}): held-out {detail}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--buildings", type=int, default=3000, help="buildings per sample département")
    parser.add_argument("--departements", nargs="+", default=list(DEMO_DEPARTEMENTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train", action="store_true", help="train new model versions on the samples (default: the shipped models)"
    )
    parser.add_argument("--train-seconds", type=float, default=600, help="training time budget of each model")
    args = parser.parse_args(argv)
    inst = instance()
    t_start = time.perf_counter()
    for k, dep in enumerate(args.departements):
        m = generate_departement(source_dir(), dep, args.buildings, seed=args.seed + k)
        print(f"sample {dep}: {m.n_buildings:,} buildings in {m.root}")
    crop, timing = {}, {}
    for dep in args.departements:
        t0 = time.perf_counter()
        crop[dep] = run(enrich_job, inst, partition=dep, assets=STAGE_CROP)
        timing[dep] = time.perf_counter() - t0
        print(f"{dep}: buildings, mosaic and chips materialized ({timing[dep]:.1f} s)")
    if args.train:
        budget = {"config": {"max_train_seconds": args.train_seconds}}
        run(train_job, inst, run_config={"ops": {a.asset: budget for a in declared_attributes().values()}})
    from orchestration.environment import local_resources

    for line in model_lines(local_resources()["models"]):
        print(line)
    pred = {}
    for dep in args.departements:
        t0 = time.perf_counter()
        pred[dep] = run(enrich_job, inst, partition=dep, assets=STAGE_PREDICT)
        timing[dep] += time.perf_counter() - t0
    print()
    for dep in args.departements:
        print(summary(dep, crop[dep], pred[dep], timing[dep]))
        print()
    print(f"done in {time.perf_counter() - t_start:.0f} s. Tables in {data_dir() / 'warehouse.duckdb'}.")
    print("Open the Dagster UI with `make ui` (then http://127.0.0.1:3000) to browse assets, runs and lineage.")
    versions = {n: pred[args.departements[0]]["predictions"].get(f"{n}_model_version") for n in declared_attributes()}
    print(json.dumps({"demo": "ok", "departements": args.departements, "models": versions}))


if __name__ == "__main__":
    main()
