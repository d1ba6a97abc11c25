"""The scaling study's numbers, fitted slopes, statements, CSVs and plots (:mod:`mtfm.bench.scaling` runs it).

Every GAUC here is recomputed from the saved test predictions (``preds_*.npz`` of each run) so
that its test-set noise can be estimated: a **paired user bootstrap** draws the test users with
replacement ``B`` times and scores every model (every width, every checkpoint) on the same draw
(GAUC is an exposure-weighted mean of per-user AUCs, :func:`mtfm.metrics.per_user_auc`, so a
draw only reweights them). Each fitted slope (GAUC per decade of FLOPs or of training tokens,
ordinary least squares) is then refitted on every draw; its spread is the slope's ``sd``, and
``p_positive`` the share of draws in which it is above zero. A curve is said to **rise** when
its slope exceeds two of its sds, to **fall** when it is below minus two, else to be **flat
within noise**. The gap between sizes **widens** when the slope of (largest minus smallest
width's GAUC) against log tokens exceeds two of its sds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from mtfm.metrics import per_user_auc

PLOT_TASKS = ("ctcvr", "ctr")  # the paper's Figure 4a reads CTCVR; CTR is the better-powered task here


# ---------------------------------------------------------------------------------------------
# Per-user AUCs and the paired bootstrap
# ---------------------------------------------------------------------------------------------


def _task_auc(preds: np.lib.npyio.NpzFile, scenario: str, task_index: int):
    mask = preds[f"{scenario}/mask"][:, task_index]
    return per_user_auc(preds[f"{scenario}/users"][mask], preds[f"{scenario}/labels"][mask, task_index],
                        preds[f"{scenario}/probs"][mask, task_index])


def user_auc_matrix(pred_files: list[Path], scenario: str, task_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-user AUCs of several prediction files of the same test rows: (users x files) and the
    users' exposure counts. The scored users must be the same in every file (they depend on the
    labels only), else the files are not of one test split and pairing would be wrong."""
    columns, users, exposures = [], None, None
    for path in pred_files:
        with np.load(path) as preds:
            per_user = _task_auc(preds, scenario, task_index)
        if users is None:
            users, exposures = per_user.users, per_user.exposures
        elif not (np.array_equal(users, per_user.users) and np.array_equal(exposures, per_user.exposures)):
            raise ValueError(f"{path}: scores other test users for {scenario} than {pred_files[0]} "
                             "(predictions of different data cannot be paired)")
        columns.append(per_user.auc)
    return np.stack(columns, axis=1), exposures


def bootstrap_gauc(auc: np.ndarray, exposures: np.ndarray, draws: int, seed: int) -> np.ndarray:
    """GAUC of every column of ``auc`` on ``draws`` user resamples, the same resample for every
    column: shape (draws, columns). Row 0 is not special; the point estimate is computed apart."""
    rng = np.random.default_rng(seed)
    n = auc.shape[0]
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(draws)])
    weights = counts * exposures[None, :]
    return (weights @ auc) / weights.sum(axis=1, keepdims=True)


def gauc_point(auc: np.ndarray, exposures: np.ndarray) -> np.ndarray:
    """GAUC of every column (exposure-weighted mean of the users' AUCs)."""
    return (exposures @ auc) / exposures.sum()


def fit_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """OLS slope of y on x; ``y`` may carry draws in its leading axes (the last axis is the points)."""
    xc = x - x.mean()
    yc = y - y.mean(axis=-1, keepdims=True)
    return (yc * xc).sum(axis=-1) / (xc * xc).sum()


def slope_record(x: np.ndarray, point: np.ndarray, draws: np.ndarray) -> dict:
    """Slope, its bootstrap sd, the share of positive draws and the verdict (module doc)."""
    slope, boot = float(fit_slope(x, point)), fit_slope(x, draws)
    sd = float(boot.std(ddof=1)) if boot.size > 1 else float("nan")
    verdict = "rises" if slope > 2 * sd else "falls" if slope < -2 * sd else "flat within noise"
    return {"slope_per_decade": slope, "sd": sd, "p_positive": float((boot > 0).mean()), "verdict": verdict}


# ---------------------------------------------------------------------------------------------
# Summaries of the two figures
# ---------------------------------------------------------------------------------------------


def _task_names(results: list[dict], scenario: str) -> list[str]:
    return list(results[0]["test"][scenario])


def size_summary(results: list[dict], scenarios: list[str], draws: int, seed: int) -> dict:
    """Figure 4a: per (scenario, task), each model's GAUC and sd, and each arch's slope over log10 GFLOPs."""
    out: dict = {}
    files = [Path(r["run"]) / "preds_final.npz" for r in results]
    gflops = np.array([r["flops_per_exposure"] / 1e9 for r in results])
    arch = np.array([r["arch"] for r in results])
    for scenario in scenarios:
        for t, task in enumerate(_task_names(results, scenario)):
            auc, exposures = user_auc_matrix(files, scenario, t)
            if auc.shape[0] < 2:  # a rare task with (almost) no user holding both classes: nothing to fit
                continue
            point, boot = gauc_point(auc, exposures), bootstrap_gauc(auc, exposures, draws, seed)
            points = [{"name": r["name"], "arch": r["arch"], "width": r["width"], "gflops": float(g),
                       "gauc": float(p), "gauc_sd": float(b.std(ddof=1)), "auc": r["test"][scenario][task]["auc"],
                       "positives": r["test"][scenario][task]["positives"]}
                      for r, g, p, b in zip(results, gflops, point, boot.T)]
            slopes = {}
            for name in sorted(set(arch)):
                pick = arch == name
                if pick.sum() >= 2:
                    slopes[name] = slope_record(np.log10(gflops[pick]), point[pick], boot[:, pick])
            out.setdefault(scenario, {})[task] = {"points": points, "slopes": slopes, "users_scored": int(auc.shape[0])}
    return out


def data_summary(results: list[dict], scenario: str, draws: int, seed: int) -> dict:
    """Figure 4b: per task of ``scenario``, every width's GAUC along training tokens, its slope over
    log10 tokens, and the gap (largest minus smallest width) with its slope."""
    curves = [r for r in results if r["curve"]]
    if not curves:
        return {}
    files, owner = [], []
    for i, r in enumerate(curves):
        for c in r["curve"]:
            files.append(Path(r["run"]) / f"preds_{c['checkpoint']}.npz")
            owner.append(i)
    owner_arr = np.array(owner)
    out: dict = {}
    for t, task in enumerate(_task_names(results, scenario)):
        auc, exposures = user_auc_matrix(files, scenario, t)
        if auc.shape[0] < 2:  # a rare task with (almost) no user holding both classes: nothing to fit
            continue
        point, boot = gauc_point(auc, exposures), bootstrap_gauc(auc, exposures, draws, seed)
        per_width = []
        for i, r in enumerate(curves):
            pick = owner_arr == i
            tokens = np.array([c["tokens"] for c in r["curve"]], dtype=np.float64)
            points = [{"step": c["step"], "tokens": int(c["tokens"]), "gauc": float(p), "gauc_sd": float(b.std(ddof=1))}
                      for c, p, b in zip(r["curve"], point[pick], boot[:, pick].T)]
            fit = slope_record(np.log10(tokens), point[pick], boot[:, pick]) if len(points) >= 2 else None
            per_width.append({"name": r["name"], "width": r["width"], "gflops": r["flops_per_exposure"] / 1e9,
                              "points": points, "slope": fit})
        record = {"widths": per_width}
        small, large = min(range(len(curves)), key=lambda i: curves[i]["width"]), max(
            range(len(curves)), key=lambda i: curves[i]["width"])
        if small != large and len(curves[small]["curve"]) == len(curves[large]["curve"]) >= 2:
            tokens = np.array([c["tokens"] for c in curves[large]["curve"]], dtype=np.float64)
            gap = point[owner_arr == large] - point[owner_arr == small]
            gap_boot = boot[:, owner_arr == large] - boot[:, owner_arr == small]
            record["gap"] = {"between": [curves[small]["name"], curves[large]["name"]],
                             "gap": [float(g) for g in gap], "gap_sd": [float(s) for s in gap_boot.std(axis=0, ddof=1)],
                             "slope": slope_record(np.log10(tokens), gap, gap_boot)}
            sd = record["gap"]["slope"]["sd"]
            slope = record["gap"]["slope"]["slope_per_decade"]
            record["gap"]["verdict"] = ("widens" if slope > 2 * sd else "narrows" if slope < -2 * sd
                                        else "neither widens nor narrows beyond noise")
        out[task] = record
    return out


def summarise(results: list[dict], world: dict, draws: int, seed: int = 0) -> dict:
    """Both figures' numbers and verdicts (see the module doc)."""
    scenarios = world["scenarios"]
    return {"status": "done", "world": world, "bootstrap_draws": draws,
            "size": size_summary(results, scenarios, draws, seed),
            "data": data_summary(results, world["curve_scenario"], draws, seed)}


# ---------------------------------------------------------------------------------------------
# CSVs and plots (the plotted series are the CSVs' rows)
# ---------------------------------------------------------------------------------------------


SIZE_COLUMNS = ("scenario", "task", "arch", "width", "gflops", "gauc", "gauc_sd", "auc", "positives")
DATA_COLUMNS = ("scenario", "task", "width", "step", "tokens", "gauc", "gauc_sd")


def size_rows(summary: dict) -> list[dict]:
    return [{"scenario": s, "task": t, **{k: p[k] for k in SIZE_COLUMNS[2:]}}
            for s, tasks in summary["size"].items() for t, rec in tasks.items() for p in rec["points"]]


def data_rows(summary: dict) -> list[dict]:
    scenario = summary["world"]["curve_scenario"]
    return [{"scenario": scenario, "task": t, "width": w["width"], **{k: p[k] for k in DATA_COLUMNS[3:]}}
            for t, rec in summary["data"].items() for w in rec["widths"] for p in w["points"]]


def write_csv(rows: list[dict], columns: tuple[str, ...], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("the scaling plots need matplotlib: pip install 'mtfm[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_size(rows: list[dict], path: Path):
    """Figure 4a: GAUC against inference GFLOPs per exposure, one panel per (task, scenario), one
    line per arch; returns the figure (tests read its lines back against the CSV)."""
    plt = _pyplot()
    tasks = [t for t in PLOT_TASKS if any(r["task"] == t for r in rows)]
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, axes = plt.subplots(len(tasks), len(scenarios), figsize=(3.4 * len(scenarios), 3.0 * len(tasks)),
                             squeeze=False)
    for i, task in enumerate(tasks):
        for j, scenario in enumerate(scenarios):
            ax = axes[i][j]
            for arch, style in (("mtfm", "o-"), ("mmoe", "s--")):
                line = [r for r in rows if (r["scenario"], r["task"], r["arch"]) == (scenario, task, arch)]
                if line:
                    ax.errorbar([r["gflops"] for r in line], [r["gauc"] for r in line],
                                yerr=[r["gauc_sd"] for r in line], fmt=style, capsize=3, label=arch.upper())
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels of a <1-decade axis overlap
            ax.set_title(f"{scenario} {task}")
            ax.set_xlabel("inference GFLOPs per exposure")
            ax.set_ylabel("test GAUC")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_data(rows: list[dict], path: Path):
    """Figure 4b: the curve scenario's GAUC against training tokens seen, one line per width."""
    plt = _pyplot()
    tasks = [t for t in PLOT_TASKS if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for width in sorted({r["width"] for r in rows}):
            line = [r for r in rows if r["task"] == task and r["width"] == width]
            ax.errorbar([r["tokens"] for r in line], [r["gauc"] for r in line], yerr=[r["gauc_sd"] for r in line],
                        fmt="o-", capsize=3, label=f"MTFM d_model {width}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_title(f"{rows[0]['scenario']} {task}")
        ax.set_xlabel("training tokens seen")
        ax.set_ylabel("test GAUC")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _slope_text(rec: dict | None) -> str:
    if rec is None:
        return "-"
    return f"{rec['slope_per_decade']:+.4f} ± {rec['sd']:.4f} ({rec['verdict']}, P>0 {rec['p_positive']:.2f})"


def format_report(summary: dict, results: list[dict]) -> str:
    """The Markdown report: models, Figure 4a table and slopes, Figure 4b table, slopes and gap."""
    world = summary["world"]
    lines = ["## Scaling study (paper Figure 4)", "",
             f"One training seed per model; ± is the paired user-bootstrap sd of the test GAUC "
             f"({summary['bootstrap_draws']} draws); slopes are GAUC per decade (OLS on log10). The verdicts "
             "weigh test-set noise only: training-seed noise is not in them (on the 16k-user world a second "
             "--seed moved size slopes by up to 0.02 per decade), so rerun with another --seed before calling one.", "",
             "| model | width | GFLOPs/exposure | parameters | steps | train s | exposures/s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['width']} | {r['flops_per_exposure'] / 1e9:.5f} | "
                     f"{r['parameters']['total']:,} | {r['steps']} | {r['train_seconds']:.0f} | {r['exposures_per_s']:,.0f} |")
    lines += ["", "### GAUC against model size (Figure 4a)", ""]
    for scenario, tasks in summary["size"].items():
        for task, rec in tasks.items():
            cells = " | ".join(f"{p['name']} {p['gauc']:.4f} ± {p['gauc_sd']:.4f}" for p in rec["points"])
            lines.append(f"- {scenario} {task} ({rec['users_scored']:,} users scored): {cells}")
            for arch, slope in rec["slopes"].items():
                lines.append(f"  - {arch.upper()} slope: {_slope_text(slope)}")
    if summary["data"]:
        lines += ["", f"### {world['curve_scenario']} GAUC against training tokens (Figure 4b)", ""]
        for task, rec in summary["data"].items():
            lines.append(f"- {task}:")
            for w in rec["widths"]:
                pts = ", ".join(f"{p['tokens'] / 1e6:.1f}M: {p['gauc']:.4f}" for p in w["points"])
                lines.append(f"  - d_model {w['width']}: slope {_slope_text(w['slope'])}; {pts}")
            if "gap" in rec:
                g = rec["gap"]
                lines.append(f"  - gap {g['between'][1]} - {g['between'][0]}: "
                             + ", ".join(f"{x:+.4f}" for x in g["gap"])
                             + f"; slope {_slope_text(g['slope'])}: the gap {g['verdict']}")
    return "\n".join(lines)


def write_outputs(summary: dict, results: list[dict], out: Path) -> str:
    """scaling.json (everything), scaling.md, the two CSVs and the two PNGs; returns the report."""
    from mtfm.bench.scaling import MARKER, REPORT

    size, data = size_rows(summary), data_rows(summary)
    write_csv(size, SIZE_COLUMNS, out / "scaling_size.csv")
    plot_size(size, out / "scaling_size.png")
    if data:
        write_csv(data, DATA_COLUMNS, out / "scaling_data.csv")
        plot_data(data, out / "scaling_data.png")
    report = format_report(summary, results)
    (out / REPORT).write_text(report + "\n")
    (out / MARKER).write_text(json.dumps({**summary, "runs": results}, indent=2))
    return report
