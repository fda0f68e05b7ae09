"""Asset checks: the invariants a partition must hold before it is published, with their history in the UI.

Each check reads what was published (the warehouse, the object store, the
source), not the step's own counters, so it can be run again from the UI at
any time and says the truth about the data as it is. The blocking ones stop
a run's downstream assets for that partition when they fail (severity ERROR):
a broken ``chips`` partition gets no predictions, a broken ``predictions``
partition does not rebuild its dbt models. The dbt tests are asset checks of
the dbt models (dagster-dbt loads them).
"""

import pyarrow.parquet as pq
from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, Config, MetadataValue, asset_check
from pydantic import Field

from assets.buildings import buildings
from assets.chips import chips
from assets.metadata import counts_table
from assets.partitions import departements_partitions
from assets.predictions import predictions
from ops.geo.departements import check_departement
from ops.geo.footprints import count_features, read_source
from ops.ml.attributes import chip_sets, declared_attributes
from ops.shards import STATUSES, index_rows, list_shards, read_index
from resources import keys
from resources.imagery import FootprintSource
from resources.object_store import ObjectStore
from resources.warehouse import Warehouse

#: The attributes' own chip sets (models/attributes.yaml), checked like the default chips.
CHIP_SETS = sorted(chip_sets(declared_attributes()))


def _warehouse_buildings(warehouse: Warehouse, dep: str) -> int:
    return int(warehouse.query("select count(*) as n from buildings where departement = ?", [dep])["n"].iloc[0])


def _staged_buildings(store: ObjectStore, dep: str) -> int:
    """Rows of the partition's `buildings` GeoParquet (published to the warehouse by `predictions`)."""
    return pq.ParquetFile(store.path(keys.buildings(dep))).metadata.num_rows


@asset_check(
    name="match_source",
    asset=buildings,
    partitions_def=departements_partitions,
    blocking=True,
    description="The `buildings` GeoParquet holds one row per feature of the source file, no more, no less.",
)
def buildings_match_source(
    context: AssetCheckExecutionContext, footprints: FootprintSource, store: ObjectStore
) -> AssetCheckResult:
    dep = check_departement(context.partition_key)
    src = footprints.footprints(dep)
    read = read_source(store.path(keys.buildings(dep)))  # the layer `buildings` was configured to read
    features = count_features(src, read[1] if read else None)
    rows = _staged_buildings(store, dep)
    return AssetCheckResult(
        passed=rows == features,
        description=None if rows == features else f"partition {dep}: {features} features in {src.name}, {rows} rows",
        metadata={"source_features": features, "buildings_rows": rows, "source": MetadataValue.path(str(src))},
    )


@asset_check(
    name="index_has_every_building",
    asset=chips,
    partitions_def=departements_partitions,
    blocking=True,
    description="The chips index has exactly one row per building of the partition (chip or not).",
)
def chips_index_has_every_building(context: AssetCheckExecutionContext, store: ObjectStore) -> AssetCheckResult:
    dep = check_departement(context.partition_key)
    rows = _staged_buildings(store, dep)
    metadata: dict = {"buildings": rows}
    wrong = []
    for chip_set in ["", *CHIP_SETS]:  # the default chips and every declared attribute's own set
        folder = store.folder(keys.chips(dep, chip_set))
        shards = list_shards(folder)
        indexed = sum(index_rows(folder, s) for s in shards)
        ids = [i for s in shards for i in read_index(folder, s).column("building_id").to_pylist()]
        duplicated = len(ids) - len(set(ids))
        prefix = f"{chip_set}_" if chip_set else ""
        metadata |= {
            f"{prefix}index_rows": indexed,
            f"{prefix}duplicated_ids": duplicated,
            f"{prefix}shards": len(shards),
        }
        if indexed != rows or duplicated:
            what = f"chip set {chip_set}: " if chip_set else ""
            wrong.append(f"{what}{indexed} index rows ({duplicated} duplicated)")
    return AssetCheckResult(
        passed=not wrong,
        description=f"partition {dep}: {'; '.join(wrong)} for {rows} buildings" if wrong else None,
        metadata=metadata,
    )


class StatusSharesConfig(Config):
    warn_above: dict[str, float] = Field(
        default_factory=lambda: {"no_imagery": 0.05, "nodata": 0.05},
        description="Status → share of the partition's buildings above which the check warns",
    )
    fail_above: dict[str, float] = Field(
        default_factory=lambda: {"error": 0.01},
        description="Status → share above which the check fails (blocking: no predictions for the partition)",
    )


@asset_check(
    name="status_shares",
    asset=chips,
    partitions_def=departements_partitions,
    blocking=True,
    description="Shares of buildings without a chip stay under thresholds: warn when no_imagery or nodata "
    "exceeds 5 %, fail when error exceeds 1 % (configurable).",
)
def chips_status_shares(
    context: AssetCheckExecutionContext, config: StatusSharesConfig, store: ObjectStore
) -> AssetCheckResult:
    dep = check_departement(context.partition_key)
    for name in {*config.warn_above, *config.fail_above} - set(STATUSES):
        raise ValueError(f"chips status_shares check: config names status {name!r}; statuses are {STATUSES}")
    folder = store.folder(keys.chips(dep))
    counts = dict.fromkeys(STATUSES, 0)
    for shard in list_shards(folder):
        for s in read_index(folder, shard).column("status").to_pylist():
            counts[s] += 1
    total = sum(counts.values())
    shares = {s: counts[s] / total if total else 0.0 for s in STATUSES}
    failing = [f"{s} {shares[s]:.1%} > {t:.1%}" for s, t in config.fail_above.items() if shares[s] > t]
    warning = [f"{s} {shares[s]:.1%} > {t:.1%}" for s, t in config.warn_above.items() if shares[s] > t]
    bad = failing or warning
    return AssetCheckResult(
        passed=not bad,
        severity=AssetCheckSeverity.ERROR if failing else AssetCheckSeverity.WARN,
        description=f"partition {dep}: " + ", ".join(bad) if bad else None,
        metadata={
            "statuses": counts_table(counts),
            "buildings": total,
            **{f"share_{s}": round(v, 4) for s, v in shares.items()},
        },
    )


@asset_check(
    name="account_for_every_building",
    asset=predictions,
    partitions_def=departements_partitions,
    blocking=True,
    description="Accounting invariant: for each model version of the partition, exactly one prediction row "
    "per building of the warehouse, and none for another building.",
)
def predictions_account_for_every_building(
    context: AssetCheckExecutionContext, warehouse: Warehouse
) -> AssetCheckResult:
    dep = check_departement(context.partition_key)
    n = _warehouse_buildings(warehouse, dep)
    per_version = warehouse.query(
        """
        with b as (select building_id from buildings where departement = ?),
             p as (select model_name, model_version, building_id from predictions where departement = ?)
        select p.model_name as model_name, p.model_version as model_version, count(*) as row_count,
               count(distinct p.building_id) as distinct_buildings,
               sum(case when b.building_id is null then 1 else 0 end) as unknown_buildings
        from p left join b on b.building_id = p.building_id
        group by p.model_name, p.model_version
        order by p.model_name, p.model_version
        """,
        [dep, dep],
    )
    wrong = per_version[
        (per_version.row_count != n) | (per_version.distinct_buildings != n) | (per_version.unknown_buildings != 0)
    ]
    lines = [
        f"{r.model_name}@{r.model_version}: {r.row_count} rows, {r.distinct_buildings} buildings, "
        f"{int(r.unknown_buildings)} unknown, for {n} buildings"
        for r in wrong.itertuples()
    ]
    passed = not lines and len(per_version) > 0
    return AssetCheckResult(
        passed=passed,
        description=None if passed else f"partition {dep}: " + ("; ".join(lines) or "no prediction rows"),
        metadata={
            "buildings": n,
            "model_versions": MetadataValue.md(
                "| model | rows | buildings | unknown |\n|---|---:|---:|---:|\n"
                + "\n".join(
                    f"| {r.model_name}@{r.model_version} | {r.row_count} | {r.distinct_buildings} | {int(r.unknown_buildings)} |"
                    for r in per_version.itertuples()
                )
            ),
        },
    )


@asset_check(
    name="scores_are_probabilities",
    asset=predictions,
    partitions_def=departements_partitions,
    blocking=True,
    description="Every score of the partition's predictions is a probability, in [0, 1].",
)
def predictions_scores_are_probabilities(context: AssetCheckExecutionContext, warehouse: Warehouse) -> AssetCheckResult:
    dep = check_departement(context.partition_key)
    out = warehouse.query(
        """select count(*) as n, sum(case when score < 0 or score > 1 then 1 else 0 end) as bad,
                  min(score) as lo, max(score) as hi
           from predictions where departement = ? and score is not null""",
        [dep],
    ).iloc[0]
    bad = int(out["bad"] or 0)
    return AssetCheckResult(
        passed=bad == 0,
        description=None if bad == 0 else f"partition {dep}: {bad} scores outside [0, 1]",
        metadata={"scores": int(out["n"]), "outside": bad, "min": float(out["lo"] or 0), "max": float(out["hi"] or 0)},
    )
