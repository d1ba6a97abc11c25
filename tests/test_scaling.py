"""The scaling study (`mtfm bench scaling`, paper Figure 4) on a tiny world: what it plots is what
it writes, its GAUCs are the library's, its statistics do what they say."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mtfm.bench.scaling import (
    MARKER, ScalingOptions, ScalingWorld, check_out_dir, flops_per_exposure, match_mmoe, mtfm_size, run_study,
)
from mtfm.bench.scaling_report import (
    DATA_COLUMNS, SIZE_COLUMNS, bootstrap_gauc, fit_slope, gauc_point, plot_data, plot_size, slope_record,
)
from mtfm.metrics import gauc, per_user_auc

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scaling") / "study"
    opts = ScalingOptions(out=out, widths=[8, 16], curve_points=3, max_steps=12, batch_size=16, bootstrap=30,
                          world=ScalingWorld(users=150, days=6), quiet=True)
    _, summary = run_study(opts)
    return out, json.loads((out / MARKER).read_text())


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _plotted(fig) -> list[tuple[list[float], list[float]]]:
    """Every errorbar line's (x, y) in the figure, panel by panel, read back from matplotlib."""
    series = []
    for ax in fig.axes:
        for container in ax.containers:
            data_line = container.lines[0]
            series.append(([float(v) for v in data_line.get_xdata()], [float(v) for v in data_line.get_ydata()]))
    return series


def test_outputs_exist_and_runs_are_what_was_asked(study):
    out, result = study
    for name in ("scaling.md", "scaling_size.csv", "scaling_size.png", "scaling_data.csv", "scaling_data.png"):
        assert (out / name).stat().st_size > 0, name
    names = [r["name"] for r in result["runs"]]
    assert names == ["mtfm-w8", "mmoe-at-w8", "mtfm-w16", "mmoe-at-w16"]
    mtfm = [r for r in result["runs"] if r["arch"] == "mtfm"]
    assert [r["model"]["d_model"] for r in mtfm] == [8, 16]
    assert all(r["steps"] == 12 for r in result["runs"])
    # matched FLOPs: each MMoE within 25% of its MTFM (the width grid is coarse at this tiny size)
    for m, b in zip(mtfm, [r for r in result["runs"] if r["arch"] == "mmoe"]):
        assert abs(np.log(b["flops_per_exposure"] / m["flops_per_exposure"])) < np.log(1.25)
    # the curve: checkpoints every ceil(12 / 3) = 4 steps, tokens strictly growing
    for r in mtfm:
        assert [c["step"] for c in r["curve"]] == [4, 8, 12]
        tokens = [c["tokens"] for c in r["curve"]]
        assert tokens == sorted(tokens) and tokens[0] > 0 and len(set(tokens)) == 3


def test_size_csv_is_what_was_plotted_and_is_the_library_gauc(study, tmp_path):
    out, result = study
    rows = _read_csv(out / "scaling_size.csv")
    assert rows and list(rows[0]) == list(SIZE_COLUMNS)
    by_name = {r["name"]: r for r in result["runs"]}
    for row in rows:  # each GAUC is the one `mtfm evaluate` computes from the same checkpoint
        run = by_name[f"{row['arch']}-w{row['width']}" if row["arch"] == "mtfm" else f"mmoe-at-w{row['width']}"]
        assert float(row["gauc"]) == pytest.approx(run["test"][row["scenario"]][row["task"]]["gauc"], abs=1e-9)
    typed = [{**r, "gflops": float(r["gflops"]), "gauc": float(r["gauc"]), "gauc_sd": float(r["gauc_sd"]),
              "width": int(r["width"])} for r in rows]
    fig = plot_size(typed, tmp_path / "again.png")
    plotted = _plotted(fig)
    expected = []
    for task in ("ctcvr", "ctr"):
        for scenario in dict.fromkeys(r["scenario"] for r in typed):
            for arch in ("mtfm", "mmoe"):
                line = [r for r in typed if (r["scenario"], r["task"], r["arch"]) == (scenario, task, arch)]
                if line:
                    expected.append(([r["gflops"] for r in line], [r["gauc"] for r in line]))
    assert plotted == expected


def test_data_csv_is_what_was_plotted_and_recomputes_from_predictions(study, tmp_path):
    out, result = study
    rows = _read_csv(out / "scaling_data.csv")
    assert rows and list(rows[0]) == list(DATA_COLUMNS)
    scenario = result["world"]["curve_scenario"]
    runs = {r["width"]: r for r in result["runs"] if r["arch"] == "mtfm"}
    for row in rows:
        run = runs[int(row["width"])]
        ckpt = next(c for c in run["curve"] if c["step"] == int(row["step"]))
        with np.load(Path(run["run"]) / f"preds_{ckpt['checkpoint']}.npz") as preds:
            t = list(run["test"][scenario]).index(row["task"])
            mask = preds[f"{scenario}/mask"][:, t]
            direct = gauc(preds[f"{scenario}/users"][mask], preds[f"{scenario}/labels"][mask, t],
                          preds[f"{scenario}/probs"][mask, t]).gauc
        assert float(row["gauc"]) == pytest.approx(direct, abs=1e-9)
        assert int(row["tokens"]) == ckpt["tokens"]
    typed = [{**r, "tokens": int(r["tokens"]), "gauc": float(r["gauc"]), "gauc_sd": float(r["gauc_sd"]),
              "width": int(r["width"])} for r in rows]
    plotted = _plotted(plot_data(typed, tmp_path / "again.png"))
    expected = [([float(r["tokens"]) for r in typed if r["task"] == task and r["width"] == w],
                 [r["gauc"] for r in typed if r["task"] == task and r["width"] == w])
                for task in ("ctcvr", "ctr") if any(r["task"] == task for r in typed) for w in sorted(runs)]
    assert plotted == expected


def test_last_curve_checkpoint_scores_like_the_final_evaluation(study):
    _, result = study
    scenario = result["world"]["curve_scenario"]
    for run in (r for r in result["runs"] if r["arch"] == "mtfm"):
        with np.load(Path(run["run"]) / f"preds_{run['curve'][-1]['checkpoint']}.npz") as a, \
                np.load(Path(run["run"]) / "preds_final.npz") as b:
            np.testing.assert_array_equal(a[f"{scenario}/probs"], b[f"{scenario}/probs"])


def test_out_dir_is_refused_unless_an_earlier_study(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_out_dir(tmp_path / "other", overwrite=False)
    with pytest.raises(FileExistsError, match="did not write"):
        check_out_dir(tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()


def test_bootstrap_is_paired_and_gauc_point_is_the_library_gauc():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 6)
    labels = (rng.random(users.size) < 0.4).astype(np.int8)
    scores_a, scores_b = rng.random(users.size), rng.random(users.size)
    a, b = per_user_auc(users, labels, scores_a), per_user_auc(users, labels, scores_b)
    auc = np.stack([a.auc, b.auc, a.auc], axis=1)
    point = gauc_point(auc, a.exposures)
    assert point[0] == pytest.approx(gauc(users, labels, scores_a).gauc)
    assert point[1] == pytest.approx(gauc(users, labels, scores_b).gauc)
    draws = bootstrap_gauc(auc, a.exposures, 50, seed=1)
    np.testing.assert_array_equal(draws[:, 0], draws[:, 2])  # the same users score every column
    assert draws[:, 0].std() > 0 and not np.allclose(draws[:, 0], draws[:, 1])


def test_slope_fit_and_verdicts():
    x = np.log10([1.0, 2.0, 5.0, 10.0])
    y = 0.6 + 0.02 * x
    assert float(fit_slope(x, y)) == pytest.approx(np.polyfit(x, y, 1)[0])
    quiet = np.tile(y, (100, 1)) + np.random.default_rng(0).normal(0, 1e-4, (100, 4))
    assert slope_record(x, y, quiet)["verdict"] == "rises"
    assert slope_record(x, -y, -quiet)["verdict"] == "falls"
    noisy = np.tile(y, (100, 1)) + np.random.default_rng(0).normal(0, 0.05, (100, 4))
    assert slope_record(x, y, noisy)["verdict"] == "flat within noise"


def test_widths_scale_flops_and_mmoe_matches(tiny_world_for_flops):
    from mtfm.model.config import load_model_config

    data, schema, batches = tiny_world_for_flops
    base = load_model_config("small").model_dump(mode="json")
    flops = [flops_per_exposure("mtfm", mtfm_size(base, w), schema, batches) for w in (16, 32, 64)]
    assert flops[0] < flops[1] < flops[2]
    config, matched = match_mmoe(flops[1], schema, batches)
    assert abs(np.log(matched / flops[1])) < np.log(1.2)
    with pytest.raises(ValueError, match="multiple of the preset's 2 heads"):
        mtfm_size(base, 33)


@pytest.fixture(scope="module")
def tiny_world_for_flops(study):
    from mtfm.data.loader import BatchLoader

    out, _ = study
    loader = BatchLoader(out / "data", "train", 16, shuffle=False, seed=0, prefetch=0)
    return out / "data", loader.schema, [b for _, b in zip(range(2), loader.iterate(0))]
