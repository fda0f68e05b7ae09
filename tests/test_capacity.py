"""The capacity plan's arithmetic (orchestration/capacity.py), checked against figures worked out by hand.

Two départements of 100,000 and 50,000 buildings, 5,000 chips/s per core, roof_type 8,000 and
solar_panels 2,000 images/s on one GPU (so 1/8000 + 1/2000 = 0.000625 GPU-s per chip), a pool of one
4-core crop node and 2 GPU nodes, 60 s of overhead per partition; no cost per km² of imagery but where
a test gives one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from ops.geo.departements import DEPARTEMENTS, UnknownDepartementError
from ops.ml.attributes import DEFAULT_PATH
from orchestration.capacity import Plan, Pool, Prices, Rates, main, parse_model_rates, plan, select_departements
from orchestration.capacity_rates import CROP_COST, MEASURED, STATED, CropRun, crop_cost
from orchestration.capacity_workload import (
    COUNTED,
    ESTIMATE,
    FRANCE_KM2,
    buildings_by_departement,
    estimate_buildings,
    estimate_km2,
)

H = 3600.0
RATES = Rates(5_000.0, {"roof_type": 8_000.0, "solar_panels": 2_000.0}, False, 60.0, crop_core_s_per_km2=0.0)
POOL = Pool(crop_nodes=1, crop_node_cpus=4, gpu_nodes=2, concurrent_runs=8, crop_workers_per_run=4)
PRICES = Prices(crop_vcpu_hour_usd=0.02, crop_node_vcpus=8, gpu_node_hour_usd=0.5)
TWO = {"01": 100_000, "02": 50_000}


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12)


def test_two_departements_together():
    p = plan(TWO, RATES, POOL, PRICES)
    assert p.departements == ("01", "02") and p.buildings == 150_000
    assert p.crop_core_hours == approx(30 / H)  # 150,000 chips / 5,000 chips/s = 30 core-s
    assert p.gpu_hours == approx(93.75 / H)  # 150,000 × 0.000625 s
    assert (p.crop_cores, p.gpus) == (4, 2)  # one node's 4 cores; 2 partitions → 2 GPUs busy
    assert p.crop_wall_hours == approx(7.5 / H)  # 30 core-s on 4 cores
    assert p.gpu_wall_hours == approx(46.875 / H)  # 93.75 GPU-s on 2 GPUs: the bottleneck
    assert p.fill_hours == approx(5 / H)  # the largest département's crop before any inference: 20 core-s / 4
    assert p.overhead_hours == approx(60 / H)  # ceil(2 / 8 runs) = 1 round of 60 s
    assert p.wall_hours == approx((46.875 + 5 + 60) / H)
    assert p.cost_usd == approx((30 * 0.02 + 93.75 * 0.5) / H)  # $0.0131875
    assert p.pool_cost_usd == approx(111.875 / H * (1 * 8 * 0.02 + 2 * 0.5))  # pool $1.16/h held for the wall
    assert p.gpu_label == STATED
    # the shipped attributes: three on RoofNet's body (roof_type, roof_material, roof_slope), one segmenter
    assert p.cpu_inference_core_hours == approx(150_000 * (3 * 2 / 1_139 + 2 / 220) / H)


def test_one_departement_alone_is_crop_then_inference_then_overhead():
    p = plan({"01": 100_000}, RATES, POOL, PRICES)
    assert (p.crop_cores, p.gpus) == (4, 1)  # one run: its 4 workers, one predictions step's GPU
    assert p.wall_hours == approx((100_000 / 5_000 / 4 + 100_000 * 0.000625 + 60) / H)  # 5 + 62.5 + 60 s


def test_crop_bound_pool_drains_the_last_inference():
    fast_gpu = dataclasses.replace(RATES, gpu_images_per_s={"roof_type": 1e6, "solar_panels": 1e6})
    one_core = dataclasses.replace(POOL, crop_node_cpus=1)
    p = plan(TWO, fast_gpu, one_core, PRICES)
    assert p.crop_cores == 1 and p.crop_wall_hours == approx(30 / H)
    assert p.gpu_wall_hours == approx(150_000 * 2e-6 / 2 / H)  # 0.15 s
    assert p.fill_hours == approx(100_000 * 2e-6 / H)  # the largest département's inference on one GPU
    assert p.wall_hours == approx((30 + 0.2 + 60) / H)


def test_the_pool_keeps_busy_only_what_runs_and_limits_allow():
    pool = Pool(crop_nodes=10, crop_node_cpus=8, gpu_nodes=20, concurrent_runs=3, crop_workers_per_run=4)
    assert (pool.crop_cores(101), pool.gpus(101)) == (12, 3)  # 3 runs × 4 workers; 3 predictions steps
    assert (pool.crop_cores(1), pool.gpus(1)) == (4, 1)
    serial = dataclasses.replace(pool, predictions_at_once=1)  # the `gpu` pool left at its default limit
    assert serial.gpus(101) == 1
    p = plan({"01": 1_000, "02": 1_000, "03": 1_000, "04": 1_000}, RATES, pool, PRICES)
    assert p.overhead_hours == approx(2 * 60 / H)  # 4 partitions, 3 at once: 2 rounds


def test_gpu_label_switches_only_when_measured():
    assert Rates().gpu_label == STATED
    assert dataclasses.replace(RATES, gpu_measured=True).gpu_label == MEASURED
    assert plan(TWO, dataclasses.replace(RATES, gpu_measured=True), POOL, PRICES).gpu_label == MEASURED


def test_estimates_spread_france_evenly_and_add_up():
    est = estimate_buildings(DEPARTEMENTS)
    assert sum(est.values()) == 35_000_000 and len(est) == 101
    assert set(est.values()) == {346_534, 346_535}  # 35,000,000 = 101 × 346,534 + 66
    assert estimate_buildings(["2A"], france=101) == {"2A": 1}


def test_counted_where_a_footprint_file_is_found_else_estimated():
    def locate(dep: str) -> Path:
        if dep == "02":
            raise FileNotFoundError("partition 02: no footprint file")  # MissingInputError is one
        return Path(f"/src/{dep}/footprints/bd.gpkg")

    def count(path: Path) -> int:
        if "03" in str(path):
            raise ValueError("cannot count its features")  # FootprintError is one
        return 1_234

    counts, basis, why = buildings_by_departement(["01", "02", "03"], locate, count, france=101_000)
    assert counts == {"01": 1_234, "02": 1_000, "03": 1_000}
    assert basis == {"01": COUNTED, "02": ESTIMATE, "03": ESTIMATE}
    assert set(why) == {"02", "03"} and "no footprint file" in why["02"]
    counts, basis, why = buildings_by_departement(["01"], None, None, france=101_000)
    assert (counts, basis, why) == ({"01": 1_000}, {"01": ESTIMATE}, {})
    assert isinstance(plan(counts, RATES, POOL, PRICES), Plan)


def test_unknown_departement_raises_naming_it(capsys):
    assert select_departements(None) == DEPARTEMENTS
    assert select_departements(["75", "2a", "75"]) == ("75", "2A")
    with pytest.raises(UnknownDepartementError, match="'20'"):
        select_departements(["75", "20"])
    with pytest.raises(UnknownDepartementError, match="'99'"):
        plan({"99": 10}, RATES, POOL, PRICES)
    with pytest.raises(SystemExit) as exit_:
        main(["--departements", "75", "20", "--estimate-only"])
    assert exit_.value.code == 2
    assert "--departements" in capsys.readouterr().err


def test_bad_inputs_are_refused_naming_them():
    with pytest.raises(argparse.ArgumentTypeError, match="'yolo'"):
        parse_model_rates("roof_type=9000,yolo=5")
    assert parse_model_rates("solar_panels=2500") == {"solar_panels": 2500.0}
    with pytest.raises(ValueError, match="gpu_nodes"):
        Pool(gpu_nodes=0)
    with pytest.raises(ValueError, match="solar_panels"):
        Rates(gpu_images_per_s={"roof_type": 8_000.0, "solar_panels": 0.0})
    with pytest.raises(ValueError, match="département 01"):
        plan({"01": -1}, RATES, POOL, PRICES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        POOL.gpu_nodes = 3  # type: ignore[misc]


def test_the_crop_pays_for_each_km2_of_imagery_as_well_as_each_chip():
    """JPEG 2000 decoding is paid per km² of imagery, whatever the buildings on it."""
    rates = dataclasses.replace(RATES, crop_core_s_per_km2=2.0)
    p = plan(TWO, rates, POOL, PRICES, {"01": 10.0, "02": 40.0})
    assert p.km2 == 50.0
    assert p.crop_core_hours == approx((30 + 50 * 2.0) / H)  # 150,000 chips / 5,000 + 50 km² × 2 s
    assert p.crop_wall_hours == approx(130 / 4 / H)  # 32.5 s, still under the GPUs' 46.875 s
    # the fill is the crop of the département with the most crop work: 02's 10 + 80 s (01 has 20 + 20)
    assert p.fill_hours == approx(90 / 4 / H)
    p = plan({"01": 100_000}, rates, POOL, PRICES, {"01": 10.0})
    assert p.wall_hours == approx(((20 + 20) / 4 + 100_000 * 0.000625 + 60) / H)  # crop alone: 40 core-s on 4
    assert estimate_km2(DEPARTEMENTS)["2A"] == approx(FRANCE_KM2 / 101)
    assert plan(TWO, rates, POOL, PRICES).km2 == approx(2 * FRANCE_KM2 / 101)  # spread evenly unless given
    with pytest.raises(ValueError, match="département 02: km²"):
        plan(TWO, rates, POOL, PRICES, {"01": 1.0})


def test_a_formats_crop_rates_are_the_line_through_two_measured_densities():
    # 10 km²: 2,000 chips in 20 s (2 s/km² at 200/km²), 200 chips in 3 s (0.3 s/km² at 20/km²)
    s_per_km2, chips_per_s = crop_cost(CropRun(2_000, 10.0, 100.0), CropRun(200, 10.0, 200 / 3))
    assert 1 / chips_per_s == pytest.approx(1.7 / 180) and s_per_km2 == pytest.approx(2.0 - 200 * 1.7 / 180)
    with pytest.raises(ValueError, match="first run must be the denser"):
        crop_cost(CropRun(200, 10.0, 200 / 3), CropRun(2_000, 10.0, 100.0))
    with pytest.raises(ValueError, match="denser run must cost more"):
        crop_cost(CropRun(2_000, 10.0, 1_000.0), CropRun(200, 10.0, 20.0))  # 0.2 s/km² against 1 s/km²
    # measured: decoding a km² of JPEG 2000 costs over ten times what a JPEG COG's or a DEFLATE GeoTIFF's does
    assert CROP_COST["jp2"][0] > 10 * max(CROP_COST["jpeg"][0], CROP_COST["deflate"][0]) > 0
    for imagery_format, (_, chips_per_s) in CROP_COST.items():
        assert Rates.for_format(imagery_format).crop_chips_per_s_per_core == chips_per_s > 0
    assert Rates() == Rates.for_format("jp2")  # BD ORTHO as delivered
    with pytest.raises(ValueError, match="'png'.*jp2"):
        Rates.for_format("png")


def test_frances_plan_on_jpeg2000_is_led_by_decoding_its_km2(capsys):
    """What `make capacity` prints for France on BD ORTHO as delivered, and on its JPEG COGs."""
    totals = {}
    for imagery_format in ("jp2", "jpeg"):
        assert main(["--estimate-only", "--imagery-format", imagery_format]) == 0
        out = capsys.readouterr().out
        totals[imagery_format] = json.loads(out.strip().splitlines()[-1])
        assert f"crop ({imagery_format})" in out and "633,116 km² of imagery" in out
    jp2, jpeg = totals["jp2"], totals["jpeg"]
    assert jp2["km2"] == jpeg["km2"] == FRANCE_KM2 and jp2["buildings"] == 35_000_000
    s_per_km2, chips_per_s = CROP_COST["jp2"]
    assert jp2["crop_core_hours"] == pytest.approx((35e6 / chips_per_s + FRANCE_KM2 * s_per_km2) / H, abs=1e-3)
    assert FRANCE_KM2 * s_per_km2 > 35e6 / chips_per_s  # the km² outweigh the chips
    assert jp2["crop_core_hours"] > jpeg["crop_core_hours"]
    assert main(["--estimate-only", "--crop-core-s-per-km2", "0", "--crop-chips-per-s-per-core", "5000"]) == 0
    given = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert given["crop_core_hours"] == pytest.approx(35e6 / 5000 / H, abs=1e-3)


def test_declared_attributes_add_their_models_and_their_chip_sets_to_the_plan(tmp_path, capsys, monkeypatch):
    """A team's declarations file (BATIVISION_ATTRIBUTES): each attribute's model runs on every chip,
    costed at its network's rate, and an attribute with its own chips is one more crop of France."""
    monkeypatch.delenv("BATIVISION_ATTRIBUTES", raising=False)  # the shipped declarations by default
    shipped = DEFAULT_PATH.read_text()
    extra = (
        "\n  roof_cover:\n    task: classification\n    classes: [tiles, slate]\n"
        "    labels: {file: labels.csv, column: roof_cover}\n    chip: {size: 48, margin_m: 4}\n"
        "  trees:\n    task: segmentation\n    classes: [background, tree]\n    labels: {polygons: trees.gpkg}\n"
    )
    declared = tmp_path / "attributes.yaml"
    declared.write_text(shipped.rstrip() + extra)

    def totals(*args: str) -> tuple[dict, str]:
        assert main(["--estimate-only", *args]) == 0
        out = capsys.readouterr().out
        return json.loads(out.strip().splitlines()[-1]), out

    base, _ = totals()
    more, out = totals("--attributes", str(declared), "--gpu-images-per-s", "trees=1000")
    assert "roof_cover 8,000" in out and "trees 1,000" in out and "2 chip set(s)" in out
    assert (base["chip_sets"], more["chip_sets"]) == (1, 2)
    assert more["crop_core_hours"] == pytest.approx(2 * base["crop_core_hours"], abs=1e-3)
    # two more models on every chip: roof_cover at roof_type's 8,000 images/s, trees at the 1,000 given
    assert more["gpu_hours"] == pytest.approx(base["gpu_hours"] + 35e6 * (1 / 8_000 + 1 / 1_000) / H, abs=1e-3)
    assert more["cpu_inference_core_hours"] > base["cpu_inference_core_hours"]
    with pytest.raises(SystemExit):
        main(["--estimate-only", "--gpu-images-per-s", "trees=1000"])  # not declared in the shipped file
    assert "'trees'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--estimate-only", "--attributes", str(tmp_path / "missing.yaml")])
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chip sets"):
        plan(TWO, RATES, POOL, PRICES, chip_sets=0)
