"""BATIVISION_ENV=prod, end to end, against local stand-ins for Google Cloud.

The assets run with ``orchestration.environment.prod_resources()`` exactly as in
production — BigQueryWarehouse, GcsObjectStore, gs:// imagery read by GDAL
through ``/vsigs/``, the model store in the bucket, dbt's ``bigquery`` target —
only pointed at servers on 127.0.0.1: the ``local-bigquery`` emulator and
``gcp-storage-emulator``. What the test harness changes, and why:

- the BigQuery emulator is started with one fix (Parquet BYTES columns are
  loaded as they are; see ``standins/bigquery_emulator.py``);
- dbt runs with a copy of the repository's ``bigquery`` target whose auth is a
  dummy token and whose endpoint is the emulator (dbt-bigquery's ``oauth``
  method would look for Google credentials);
- the marts are materialized as views (``BATIVISION_DBT_MARTS_MATERIALIZED``):
  the emulator cannot CREATE TABLE AS SELECT; the SQL selected is the same;
- GDAL is pointed at the storage emulator with ``CPL_GS_ENDPOINT`` and
  ``GS_NO_SIGN_REQUEST`` (production leaves both unset).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from dagster import DagsterInstance, materialize
from dagster_dbt import DbtCliResource

from assets.dbt import DBT_DIR
from ops.ml.attributes import load_attributes
from orchestration.definitions import all_assets
from tests.standins.faulty_proxy import faulty_proxy
from tests.standins.servers import bigquery_emulator, gcs_emulator

pytestmark = [pytest.mark.bigquery, pytest.mark.slow, pytest.mark.xdist_group("prod")]

CROP = ["buildings", "ortho_mosaic", "chips"]
PREDICT = ["predictions", "stg_buildings", "stg_predictions", "building_attributes", "departement_summary"]
QUICK_TRAINING = {"ops": {"roof_model": {"config": {"epochs": 2}}}}
PROJECT, BUCKET = "bativision-test", "bativision-test"


def harness_dbt_profile(folder: Path) -> Path:
    """The repository's `bigquery` target with emulator auth and endpoint (see the module docstring)."""
    profiles = yaml.safe_load((DBT_DIR / "profiles.yml").read_text())
    target = dict(profiles["bativision"]["outputs"]["bigquery"])
    target.update(method="oauth-secrets", token="emulator", api_endpoint="{{ env_var('BATIVISION_BQ_API_ENDPOINT') }}")
    target["threads"] = 1
    folder.mkdir(parents=True, exist_ok=True)
    out = {"bativision": {"target": "bigquery", "outputs": {"bigquery": target}}}
    (folder / "profiles.yml").write_text(yaml.safe_dump(out))
    return folder


def upload_folder(client, local: Path, bucket: str, prefix: str) -> int:
    n = 0
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.bucket(bucket).blob(f"{prefix}/{p.relative_to(local).as_posix()}").upload_from_filename(str(p))
            n += 1
    return n


@pytest.fixture(scope="module")
def cloud(small_dep, tmp_path_factory):
    """Emulators up, the synthetic département uploaded to the bucket, the prod environment set."""
    from resources.gcs import gcs_client

    work = tmp_path_factory.mktemp("cloud")
    with bigquery_emulator(work) as bq_url, gcs_emulator(work) as gcs_url:
        gcs = gcs_client(gcs_url)
        gcs.create_bucket(BUCKET)
        assert upload_folder(gcs, small_dep.root, BUCKET, f"sources/{small_dep.departement}") > 0
        mp = pytest.MonkeyPatch()
        env = {
            "BATIVISION_ENV": "prod",
            "BATIVISION_BQ_PROJECT": PROJECT,
            "BATIVISION_BQ_DATASET": f"bv_{uuid.uuid4().hex[:8]}",
            "BATIVISION_BQ_LOCATION": "EU",
            "BATIVISION_BQ_API_ENDPOINT": bq_url,
            "BATIVISION_GCS_BUCKET": BUCKET,
            "BATIVISION_GCS_API_ENDPOINT": gcs_url,
            "BATIVISION_CACHE_DIR": str(work / "cache"),
            "CPL_GS_ENDPOINT": gcs_url + "/",
            "GS_NO_SIGN_REQUEST": "YES",
            "BATIVISION_DBT_MARTS_MATERIALIZED": "view",
        }
        for k, v in env.items():
            mp.setenv(k, v)
        from orchestration.environment import prod_resources

        resources = prod_resources()
        resources["dbt"] = DbtCliResource(
            project_dir=str(DBT_DIR),
            profiles_dir=str(harness_dbt_profile(work / "dbt_profile")),
            target="bigquery",
            dbt_executable=resources["dbt"].dbt_executable,
        )
        yield resources, gcs, small_dep
        mp.undo()


def _run(resources, selection, partition=None, run_config=None):
    result = materialize(
        all_assets,
        selection=selection,
        partition_key=partition,
        resources=resources,
        instance=DagsterInstance.ephemeral(),
        run_config=run_config,
        raise_on_error=True,
    )
    assert result.success
    return result


@pytest.fixture(scope="module")
def materialized(cloud):
    resources, gcs, dep = cloud
    crop = _run(resources, CROP, dep.departement)
    _run(resources, ["roof_model"], run_config=QUICK_TRAINING)
    _run(resources, PREDICT, dep.departement)
    chips_md = {k: v.value for k, v in crop.asset_materializations_for_node("chips")[0].metadata.items()}
    return resources, gcs, dep, chips_md


def test_tables_are_geography_and_clustered_by_departement(materialized):
    wh = materialized[0]["warehouse"]
    for name in ("buildings", "predictions"):
        table = wh.client().get_table(wh.table_id(name))
        assert table.clustering_fields == ["departement"], name
        types = {f.name: f.field_type for f in table.schema}
        assert types["geometry"] == "GEOGRAPHY", name
        assert types["departement"] == "STRING"


def test_every_building_once_and_one_prediction_each(materialized):
    resources, _, dep, _ = materialized
    wh = resources["warehouse"]
    b = wh.query("select count(*) n, count(distinct building_id) d from buildings where departement = ?", ["12"])
    assert b.n[0] == b.d[0] == dep.n_buildings
    for model in load_attributes():  # every declared attribute, the accounting invariant per model
        p = wh.query(
            "select count(*) n, count(distinct building_id) d from predictions where departement = ? and model_name = ?",
            ["12", model],
        )
        assert p.n[0] == p.d[0] == dep.n_buildings, model
    statuses = wh.query(
        "select status, count(*) n from predictions where model_name = 'roof_type' group by status"
    ).set_index("status")["n"]
    assert statuses.get("ok", 0) > 0.8 * dep.n_buildings
    assert statuses.get("no_imagery", 0) == dep.counts["outside_imagery"]


def test_geography_round_trips(materialized):
    """Areas and centroids read back from BigQuery match the GeoParquet the asset wrote (native CRS)."""
    resources, _, dep, _ = materialized
    wh = resources["warehouse"]
    got = wh.query(
        "select building_id, area_m2, ST_AREA(geometry) bq_area, ST_X(ST_CENTROID(geometry)) lon, "
        "ST_Y(ST_CENTROID(geometry)) lat, ST_ASTEXT(geometry) wkt from buildings "
        "where departement = ? and geometry_status = 'ok'",
        ["12"],
    ).set_index("building_id")
    assert len(got) > 0.8 * dep.n_buildings
    assert np.allclose(got.bq_area, got.area_m2, rtol=0.01), (got.bq_area / got.area_m2).describe()
    # centroids against the source file reprojected independently
    import geopandas as gpd

    src = gpd.read_file(dep.footprints)
    src = src.set_index(src.columns[0]) if "cleabs" not in src.columns else src.set_index("cleabs")
    common = got.index.intersection(src.index)
    assert len(common) == len(got)
    c = src.loc[common].geometry.centroid.to_crs(4326)
    assert np.allclose(c.x.to_numpy(), got.loc[common].lon.to_numpy(), atol=1e-6)
    assert np.allclose(c.y.to_numpy(), got.loc[common].lat.to_numpy(), atol=1e-6)
    assert got.wkt.str.startswith(("POLYGON", "MULTIPOLYGON")).all()


def test_rewriting_a_partition_replaces_its_rows(materialized):
    resources, _, dep, _ = materialized
    wh = resources["warehouse"]
    _run(resources, ["predictions"], dep.departement)  # publishes the partition's buildings and predictions again
    b = wh.query("select count(*) n, count(distinct building_id) d from buildings").iloc[0]
    assert b.n == b.d == dep.n_buildings
    p = wh.query("select model_name, count(*) n, count(distinct building_id) d from predictions group by 1")
    assert list(p.n) == list(p.d) == [dep.n_buildings] * len(p) and len(p) >= 1


@pytest.mark.reliability
def test_a_bigquery_answering_503_to_every_third_request_still_gets_the_partition_once(materialized):
    """Google's APIs fail transiently (backendError): the warehouse's writes and queries are retried, not lost."""
    from resources.bigquery import BigQueryWarehouse

    resources, _, dep, _ = materialized
    wh = resources["warehouse"]
    from ops.geo.reproject import wgs84_batches

    batches = list(wgs84_batches(resources["store"].path("buildings/12/buildings.parquet"), 2154))
    with faulty_proxy(wh.api_endpoint, every=3) as (url, faults):
        flaky = BigQueryWarehouse(bigquery=wh.bigquery, dataset=wh.dataset, api_endpoint=url)
        assert flaky.replace_partition("buildings", "12", batches) == dep.n_buildings
        n = flaky.query("select count(*) n, count(distinct building_id) d from buildings where departement = ?", ["12"])
    assert faults.injected >= 2, f"{faults.requests} requests, {faults.injected} failed: the test proved nothing"
    assert n.n[0] == n.d[0] == dep.n_buildings


def test_a_failed_write_leaves_the_partition_as_it_was(materialized):
    """Neither a crash while staging nor an error inside the transaction touches readers' rows."""
    resources, _, dep, _ = materialized
    wh = resources["warehouse"]
    before = wh.query("select count(*) n from buildings where departement = ?", ["12"]).n[0]
    batch = next(pq.ParquetFile(resources["store"].path("buildings/12/buildings.parquet")).iter_batches(10))

    def crashing():
        yield batch
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        wh.replace_partition("buildings", "12", crashing())
    garbage = batch.set_column(
        batch.schema.get_field_index("geometry"), "geometry", pa.array([b"not wkb"] * batch.num_rows, pa.binary())
    )
    with pytest.raises(Exception):  # noqa: B017 - the emulator's and BigQuery's error types differ
        wh.replace_partition("buildings", "12", [garbage])
    after = wh.query("select count(*) n from buildings where departement = ?", ["12"]).n[0]
    assert before == after == dep.n_buildings
    leftovers = [t.table_id for t in wh.client().list_tables(f"{wh.project}.{wh.dataset}") if "_staging_" in t.table_id]
    assert leftovers == []


def test_dbt_models_run_on_bigquery(materialized):
    resources, _, dep, _ = materialized
    wh = resources["warehouse"]
    attrs = wh.query("select * from building_attributes")
    assert len(attrs) == dep.n_buildings and attrs.building_id.is_unique
    assert attrs.roof_type_status.notna().all()
    summary = wh.query("select * from departement_summary where departement = '12'")
    assert sorted(summary.model_name) == sorted(load_attributes())
    # a regression's value, in degrees: closer to the drawn slopes than their mean is
    ok = attrs[attrs.roof_slope_status == "ok"].set_index("building_id").roof_slope_value
    truth = pd.read_csv(dep.root / "roof_slope.csv", dtype={"cleabs": str}).set_index("cleabs").slope_deg.loc[ok.index]
    assert len(ok) > 0.8 * dep.n_buildings
    assert (ok - truth).abs().mean() < (truth - truth.mean()).abs().mean(), (ok.min(), ok.max())
    assert (summary.buildings == dep.n_buildings).all() and (summary.predicted == dep.n_buildings).all()
    labelled = summary[summary.task != "regression"]  # a regression's rows have values, not labels
    assert all(d.startswith("{") and '"' in d for d in labelled.label_distribution)
    assert summary[summary.task == "regression"].mean_value.between(0, 60).all()


def test_panel_polygons_land_in_bigquery_as_geography(materialized):
    """The segmenter's polygons are GEOGRAPHY in BigQuery, on their building, with a plausible area."""
    resources, _, _, _ = materialized
    wh = resources["warehouse"]
    got = wh.query(
        "select p.building_id, ST_AREA(p.geometry) panel_m2, ST_AREA(b.geometry) roof_m2, "
        "ST_INTERSECTS(p.geometry, b.geometry) on_roof from predictions p join buildings b using (building_id) "
        "where p.model_name = 'solar_panels' and p.label = 'solar_panel'"
    )
    assert len(got) > 20
    assert got.on_roof.all()
    assert (got.panel_m2 > 1.0).all() and (got.panel_m2 <= got.roof_m2 * 1.2).all()


def test_artefacts_and_model_live_in_the_bucket(materialized):
    resources, gcs, _, _ = materialized
    names = {b.name for b in gcs.list_blobs(BUCKET, prefix="bativision/")}
    assert "bativision/buildings/12/buildings.parquet" in names
    assert "bativision/mosaic/12/mosaic.vrt" in names
    assert any(n.startswith("bativision/chips/12/") and n.endswith(".chips.npy") for n in names)
    assert any(n.startswith("bativision/predictions/12/") for n in names)
    assert "bativision/models/roof_type/CURRENT" in names
    vrt = gcs.bucket(BUCKET).blob("bativision/mosaic/12/mosaic.vrt").download_as_text()
    assert f"/vsigs/{BUCKET}/sources/12/ortho/" in vrt  # tiles are read in place, not copied
    assert not any(".tmp" in n for n in names)


def test_gs_tiles_are_prefetched_and_give_the_chips_of_a_local_crop(materialized, tmp_path):
    """The chips step fetched the blocks from the bucket (Cloud Storage API, ranges) and cut what a local crop cuts."""
    from ops.crop.partition import crop_partition
    from ops.crop.spec import ChipSpec
    from ops.imagery.mosaic import build_mosaic, find_tiles
    from ops.shards import list_shards, open_chips, read_index

    _, gcs, dep, md = materialized
    assert md["prefetch"] == "on" and md["prefetch_blocks"] > 0 and md["prefetch_requests"] > 0
    bucket = gcs.bucket(BUCKET)
    parquet = tmp_path / "buildings.parquet"
    bucket.blob(f"bativision/buildings/{dep.departement}/buildings.parquet").download_to_filename(str(parquet))
    info = build_mosaic(find_tiles(dep.ortho_dir), tmp_path / "local.vrt", name="local")
    list(crop_partition(parquet, info, tmp_path / "local", ChipSpec(), buildings_fingerprint="x"))
    shards = list_shards(tmp_path / "local")
    assert shards
    remote = tmp_path / "remote"
    remote.mkdir()
    for s in shards:
        for suffix in (".chips.npy", ".index.parquet"):
            bucket.blob(f"bativision/chips/{dep.departement}/{s}{suffix}").download_to_filename(
                str(remote / (s + suffix))
            )
        assert np.array_equal(open_chips(remote, s), open_chips(tmp_path / "local", s)), s
        assert read_index(remote, s).equals(read_index(tmp_path / "local", s)), s


def test_gdal_reads_tiles_through_vsigs(materialized):
    import rasterio

    _, gcs, dep, _ = materialized
    tile = sorted(dep.ortho_dir.iterdir())[0]
    with rasterio.open(f"/vsigs/{BUCKET}/sources/12/ortho/{tile.name}") as remote, rasterio.open(tile) as local:
        assert remote.crs == local.crs and remote.transform == local.transform
        window = ((0, 64), (0, 64))
        assert (remote.read(window=window) == local.read(window=window)).all()


def test_store_uploads_what_a_step_wrote_and_nothing_else(cloud, tmp_path):
    """Each execution starts from the bucket and sends back only new or changed files."""
    from resources.gcs import GcsObjectStore

    resources, gcs, _ = cloud
    endpoint = resources["store"].api_endpoint

    def execution() -> GcsObjectStore:
        store = GcsObjectStore(
            root=str(tmp_path), gcs=resources["store"].gcs, bucket=BUCKET, prefix="unit", api_endpoint=endpoint
        )
        store.setup_for_execution(None)
        return store

    first = execution()
    first.path("a/one.txt").write_text("1")
    first.path("a/two.txt.tmp").write_text("half-written")
    first.teardown_after_execution(None)
    blob = gcs.bucket(BUCKET).get_blob("unit/a/one.txt")
    assert blob is not None and gcs.bucket(BUCKET).get_blob("unit/a/two.txt.tmp") is None

    second = execution()
    assert (second.folder("a") / "one.txt").read_text() == "1"  # fetched from the bucket
    second.path("a/three.txt").write_text("3")
    second.teardown_after_execution(None)
    assert gcs.bucket(BUCKET).get_blob("unit/a/one.txt").generation == blob.generation  # not re-uploaded
    assert gcs.bucket(BUCKET).get_blob("unit/a/three.txt").download_as_text() == "3"

    third = execution()
    assert third.exists("a") and third.uri("a/one.txt") == f"gs://{BUCKET}/unit/a/one.txt"
    third.delete("a")
    third.teardown_after_execution(None)
    assert not [b.name for b in gcs.list_blobs(BUCKET, prefix="unit/")]


@pytest.mark.reliability
def test_an_injection_on_bigquery_touches_no_row_and_names_are_refused(materialized):
    """As on DuckDB (test_security): values are query parameters, table and column names are checked."""
    resources, _, dep, _ = materialized
    wh = resources["warehouse"]

    def counts():
        return wh.query("select departement, count(*) n from buildings group by 1 order by 1").to_dict("records")

    before = counts()
    assert before == [{"departement": "12", "n": dep.n_buildings}]
    for value in ("12' OR '1'='1", "12; DROP TABLE buildings", "12` OR TRUE --"):
        assert wh.replace_partition("buildings", value, []) == 0  # a partition of that odd name, empty
        assert wh.query("select count(*) n from buildings where departement = ?", [value]).n[0] == 0
    for table, where in [("buildings`; DROP TABLE buildings --", None), ("buildings", {"1=1 OR departement": "x"})]:
        with pytest.raises(ValueError, match="unknown warehouse table|no column"):
            wh.replace_partition(table, "12", [], where=where)
    assert counts() == before


@pytest.mark.reliability
def test_jp2_tiles_in_a_bucket_are_converted_into_the_bucket_and_kept_in_step(cloud, tmp_path_factory, tmp_path):
    """BD ORTHO in a bucket, monthly reprocessing (convert: jpeg): the COGs land in the store's bucket, once.

    What a user checks: the mosaic reads the COGs in place (``/vsigs/``), the chips pods' chips are
    those of the same conversion and crop done on local disk, a second month uploads nothing, a new
    vintage of a tile (same name, new generation) is converted again and changes the imagery id
    (the chips are cut again) — even without conversion —, a tile gone from the bucket takes its COG.
    """
    import rasterio

    from ops.crop.partition import crop_partition
    from ops.crop.spec import ChipSpec
    from ops.imagery.convert import DIGEST_TAG, SOURCE_TAG, convert_tiles
    from ops.imagery.mosaic import build_mosaic, find_tiles
    from ops.shards import list_shards, open_chips, read_index
    from synthetic import generate_departement
    from tests.test_convert import _rewrite_inverted

    resources, gcs, _ = cloud
    dep = generate_departement(tmp_path_factory.mktemp("jp2src"), "81", 80, seed=5, tile_px=500, imagery_format="jp2")
    bucket = gcs.bucket(BUCKET)
    assert upload_folder(gcs, dep.root, BUCKET, "sources/81") > 0
    jp2 = sorted(p.name for p in dep.ortho_dir.glob("*.jp2"))
    cog_prefix = "bativision/mosaic/81/cog/"

    def mosaic(convert: str) -> tuple[dict, dict]:
        r = _run(resources, ["ortho_mosaic"], "81", {"ops": {"ortho_mosaic": {"config": {"convert": convert}}}})
        md = {k: v.value for k, v in r.asset_materializations_for_node("ortho_mosaic")[0].metadata.items()}
        blobs = list(gcs.list_blobs(BUCKET, prefix=cog_prefix))
        cogs = {b.metadata[SOURCE_TAG]: b for b in blobs}
        assert len(cogs) == len(blobs)  # one COG per tile, nothing else left there (no older vintage, no temporary)
        assert all(b.name == f"{cog_prefix}{Path(n).stem}.{b.metadata[DIGEST_TAG]}.tif" for n, b in cogs.items())
        return md, cogs

    _run(resources, ["buildings"], "81")
    plain, none = mosaic("never")
    assert none == {} and plain["tiles_converted"] == "none"

    first, cogs = mosaic("jpeg")
    assert first["tiles_converted"] == f"{len(jp2)} JPEG 2000 → jpeg COG"
    assert sorted(cogs) == jp2
    vrt = bucket.blob("bativision/mosaic/81/mosaic.vrt").download_as_text()
    named = set(re.findall(rf"/vsigs/{BUCKET}/({cog_prefix}[^<]+)<", vrt))  # once per band
    assert named == {b.name for b in cogs.values()} and "/sources/81/ortho/" not in vrt
    assert first["imagery_id"] != plain["imagery_id"]

    # the chips pods crop the COGs in the bucket: the chips of the same conversion and crop on local disk
    chips_md = _run(resources, ["chips"], "81").asset_materializations_for_node("chips")[0].metadata
    assert chips_md["prefetch_blocks"].value > 0
    local_cogs = tmp_path / "cogs"
    convert_tiles(find_tiles(dep.ortho_dir), local_cogs, compression="jpeg")
    parquet = tmp_path / "buildings.parquet"
    bucket.blob("bativision/buildings/81/buildings.parquet").download_to_filename(str(parquet))
    info = build_mosaic(find_tiles(local_cogs), tmp_path / "local.vrt", name="local")
    list(crop_partition(parquet, info, tmp_path / "local", ChipSpec(), buildings_fingerprint="x"))
    remote = tmp_path / "remote"
    remote.mkdir()
    shards = list_shards(tmp_path / "local")
    assert shards
    for s in shards:
        for suffix in (".chips.npy", ".index.parquet"):
            bucket.blob(f"bativision/chips/81/{s}{suffix}").download_to_filename(str(remote / (s + suffix)))
        assert np.array_equal(open_chips(remote, s), open_chips(tmp_path / "local", s)), s
        assert read_index(remote, s)["status"].equals(read_index(tmp_path / "local", s)["status"]), s

    second, again = mosaic("jpeg")  # next month, nothing changed: nothing converted, nothing uploaded
    assert {n: b.generation for n, b in again.items()} == {n: b.generation for n, b in cogs.items()}
    assert second["imagery_id"] == first["imagery_id"]

    # a new vintage of one tile, uploaded under the same name
    changed = dep.ortho_dir / jp2[1]
    _rewrite_inverted(changed)
    bucket.blob(f"sources/81/ortho/{changed.name}").upload_from_filename(str(changed))
    plain2, _ = mosaic("never")
    assert plain2["imagery_id"] != plain["imagery_id"]  # the generation counts, not only the name
    third, after = mosaic("jpeg")
    assert {n for n in after if after[n].name != cogs[n].name} == {changed.name}  # a new object for it alone
    assert {n: b.generation for n, b in after.items() if n != changed.name} == {
        n: b.generation for n, b in cogs.items() if n != changed.name
    }
    assert third["imagery_id"] != first["imagery_id"]
    with rasterio.open(f"/vsigs/{BUCKET}/{after[changed.name].name}") as d, rasterio.open(changed) as s:
        assert np.abs(d.read().astype(np.int16) - s.read().astype(np.int16)).mean() < 3  # the new vintage's pixels

    # a tile withdrawn from the bucket: its COG goes too, the others stay untouched
    gone = jp2[-1]
    bucket.blob(f"sources/81/ortho/{gone}").delete()
    _, last = mosaic("jpeg")
    assert sorted(last) == [n for n in jp2 if n != gone]
    assert {n: b.generation for n, b in last.items()} == {n: after[n].generation for n in last}

    # two COGs of one tile (a conversion cut between its upload and the clean-up): the newest is weighed, the other
    # deleted; here the newest records another digest, so the tile is converted again, once
    kept = last[jp2[0]]
    other = bucket.copy_blob(kept, bucket, f"{cog_prefix}{Path(jp2[0]).stem}.0000other.tif")
    other.metadata = {**kept.metadata, DIGEST_TAG: "0000other"}
    other.patch()
    _, cleaned = mosaic("jpeg")  # asserts one object per tile again
    assert cleaned[jp2[0]].name == kept.name and cleaned[jp2[0]].generation != kept.generation
    assert {n: b.generation for n, b in cleaned.items() if n != jp2[0]} == {
        n: b.generation for n, b in last.items() if n != jp2[0]
    }

    # a tile in the bucket that is not a JPEG 2000 after all: the step fails naming the object
    bucket.blob(f"sources/81/ortho/{jp2[0]}").upload_from_string(b"<html>503 Service Unavailable</html>")
    with pytest.raises(Exception, match=re.escape(f"/vsigs/{BUCKET}/sources/81/ortho/{jp2[0]}: cannot be opened")):
        mosaic("jpeg")
