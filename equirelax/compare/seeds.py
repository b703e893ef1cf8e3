"""compare over several seeds: every row as mean ± std over seeds, and a paired verdict against vanilla per seed.

``equirelax compare --seeds 0 1 2`` runs the whole comparison once per seed
(``OUT/seed<s>/``, each with its own report) and writes ``OUT/report.md`` and
``OUT/results.json`` from the per-seed numbers alone. A relaxed run is said to be
below (or above) vanilla only when it is so on every seed, with at least 3
seeds; otherwise the reading says on how many seeds it was lower and that the
difference is within the spread.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

METRICS = (  # (key in results, model, label, format)
    ("force_mae_mev_per_a", "equivariant", "force MAE (meV/Å), equivariant", ".1f"),
    ("force_mae_mev_per_a", "relaxed", "force MAE, relaxed", ".1f"),
    ("energy_mae_mev_per_atom", "equivariant", "energy MAE (meV/atom), equivariant", ".2f"),
    ("energy_mae_mev_per_atom", "relaxed", "energy MAE, relaxed", ".2f"),
)
MIN_SEEDS_FOR_A_CLAIM = 3


def _value(run: dict, model: str, key: str):
    if run is None or run.get("status") != "ok":
        return None
    return (run["test"].get(model) or {}).get(key)


def _max_gamma(run: dict):
    if run is None or run.get("status") != "ok" or not run.get("gamma"):
        return None
    return max(abs(g) for g in run["gamma"].values())


def _summary(values: list) -> dict:
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0, "values": values}
    return {"mean": statistics.fmean(present), "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "n": len(present), "values": values}


def aggregate(per_seed: dict) -> dict:
    """``{seed: results of one compare}`` → mean ± std of every metric per run, and the paired verdicts."""
    seeds = sorted(per_seed)
    names = list(dict.fromkeys(run["name"] for s in seeds for run in per_seed[s]["runs"]))
    rows = {}
    for name in names:
        runs = [next((r for r in per_seed[s]["runs"] if r["name"] == name), None) for s in seeds]
        row = {"failed_seeds": [s for s, r in zip(seeds, runs) if r is None or r.get("status") != "ok"],
               "max_gamma": _summary([_max_gamma(r) for r in runs])}
        for key, model, _, _ in METRICS:
            row[f"{model}/{key}"] = _summary([_value(r, model, key) for r in runs])
        rows[name] = row
    verdicts = _paired(rows, names, "vanilla") if "vanilla" in rows else {}
    # the host's own alternatives (its baselines) are references too: each relaxed run paired with them per seed
    baselines = [b for b in dict.fromkeys(b for s in seeds for b in per_seed[s].get("baselines") or {}) if b in rows]
    relaxed = [n for n in names if n != "vanilla" and n not in baselines]
    baseline_verdicts = {b: _paired(rows, relaxed, b) for b in baselines}
    return {"seeds": seeds, "runs": rows, "verdicts": verdicts, "baseline_verdicts": baseline_verdicts}


def _paired(rows: dict, names, reference: str) -> dict:
    """``{"<run>/<model>": verdict}``: each run's force MAE paired per seed with ``reference``'s."""
    base = rows[reference]["equivariant/force_mae_mev_per_a"]["values"]
    verdicts = {}
    for name in names:
        if name == reference:
            continue
        for model in ("equivariant", "relaxed"):
            values = rows[name][f"{model}/force_mae_mev_per_a"]["values"]
            pairs = [(v, b) for v, b in zip(values, base) if v is not None and b is not None]
            if not pairs:
                continue
            differences = [v - b for v, b in pairs]
            verdicts[f"{name}/{model}"] = {
                "lower": sum(d < 0 for d in differences), "n": len(pairs),
                "mean_difference": statistics.fmean(differences),
                "std_difference": statistics.stdev(differences) if len(differences) > 1 else 0.0,
                "relative": statistics.fmean(d / b for d, (_, b) in zip(differences, pairs)),
            }
    return verdicts


def _cell(summary: dict, spec: str) -> str:
    if summary["mean"] is None:
        return "-"
    return f"{format(summary['mean'], spec)} ± {format(summary['std'], spec)}"


def seeds_table(aggregated: dict) -> str:
    labels = [label for _, _, label, _ in METRICS]
    lines = ["| run | " + " | ".join(labels) + " | max \\|γ\\| | vs vanilla (force MAE, per seed) | failed seeds |",
             "|" + "---|" * (len(labels) + 4)]
    for name, row in aggregated["runs"].items():
        cells = [_cell(row[f"{model}/{key}"], spec) for key, model, _, spec in METRICS]
        verdict = []
        for model in ("equivariant", "relaxed"):
            v = aggregated["verdicts"].get(f"{name}/{model}")
            if v:
                verdict.append(f"{model}: lower on {v['lower']} of {v['n']} ({100 * v['relative']:+.1f}%)")
        failed = ", ".join(str(s) for s in row["failed_seeds"]) or "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(row['max_gamma'], '.3f')} | "
                     f"{'; '.join(verdict) or '-'} | {failed} |")
    return "\n".join(lines)


def seeds_reading(aggregated: dict) -> list[str]:
    """What the spread supports, per relaxed run and model, against vanilla's force MAE on the same seeds (and
    against each of the host's baselines)."""
    n_seeds = len(aggregated["seeds"])
    if "vanilla" not in aggregated["runs"]:
        return [f"{n_seeds} seeds; no vanilla run to compare against."]
    lines = _verdict_lines(aggregated["verdicts"], "vanilla")
    for baseline, verdicts in (aggregated.get("baseline_verdicts") or {}).items():
        lines += _verdict_lines(verdicts, baseline)
    return lines


def _verdict_lines(verdicts: dict, reference: str) -> list[str]:
    lines = []
    for key, v in verdicts.items():
        name, model = key.split("/")
        what = f"`{name}` ({model} model)"
        change = f"{100 * v['relative']:+.1f}% on average, paired difference {v['mean_difference']:+.1f} ± " \
                 f"{v['std_difference']:.1f} meV/Å"
        if v["n"] < MIN_SEEDS_FOR_A_CLAIM:
            lines.append(f"{what}: lower than {reference} on {v['lower']} of {v['n']} seeds ({change}); too few "
                         f"seeds to claim a difference (at least {MIN_SEEDS_FOR_A_CLAIM}).")
        elif v["lower"] == v["n"]:
            lines.append(f"{what}: below {reference} on every one of {v['n']} seeds ({change}).")
        elif v["lower"] == 0:
            lines.append(f"{what}: above {reference} on every one of {v['n']} seeds ({change}).")
        else:
            lines.append(f"{what}: lower than {reference} on {v['lower']} of {v['n']} seeds ({change}): no "
                         "consistent difference, within the spread.")
    return lines


def write_seeds_report(per_seed: dict, out: Path, host: str) -> dict:
    aggregated = aggregate(per_seed)
    results = {"host": host, **aggregated, "per_seed": {str(s): str(Path(out) / f"seed{s}") for s in per_seed}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    first = per_seed[aggregated["seeds"][0]]
    lines = [
        f"# equirelax compare: {host}, {len(aggregated['seeds'])} seeds",
        "",
        f"Config `{first['config']}`, {first['epochs']} epochs, seeds {aggregated['seeds']}; test set "
        f"`{first['test_file']}` ({first['test_configurations']} configurations). Mean ± std over seeds (sample "
        "std); \"vs vanilla\" pairs each run with vanilla trained on the same seed (the reading does the same "
        "against the host's baselines). Each seed's own report, curves and γ plots: "
        "`seed<s>/report.md`.",
        "",
        seeds_table(aggregated),
        "",
        "## Reading",
        "",
        *[f"- {line}" for line in seeds_reading(aggregated)],
        "",
    ]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return results
