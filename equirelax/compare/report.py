"""compare's report: the table, a few sentences reading it, and the plots (``report.md``, ``results.json``,
``validation.png``, ``gamma.png``), from the results dict alone."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(value, spec=".1f") -> str:
    return "-" if value is None else format(value, spec)


def _metric(run: dict, model: str, key: str):
    return (run["test"].get(model) or {}).get(key)


def table(results: dict) -> str:
    header = ("| run | status | force MAE (meV/Å): equivariant / relaxed | force RMSE: equivariant / relaxed "
              "| energy MAE (meV/atom): equivariant / relaxed | equivariance error (forces): equivariant / relaxed "
              "| model epoch | γ per layer | symmetry breaking per layer | s / epoch | peak memory (MB) |")
    lines = [header, "|" + "---|" * 11]
    prefix = _common_prefix([name for run in results["runs"] for name in run["gamma"]])
    for run in results["runs"]:
        if run["status"] != "ok":
            lines.append(f"| {run['name']} | **failed**: {run['error']} | - | - | - | - | - | - | - | - | - |")
            continue

        def pair(key, spec=".1f"):
            return f"{_fmt(_metric(run, 'equivariant', key), spec)} / {_fmt(_metric(run, 'relaxed', key), spec)}"

        eq = [(run["test"].get(m) or {}).get("equivariance_error", {}).get("forces") for m in ("equivariant", "relaxed")]
        gamma = ", ".join(f"{name[len(prefix):]}: {value:.3f}" for name, value in run["gamma"].items()) or "-"
        breaking = ", ".join(f"{name[len(prefix):]}: {value:.3f}"
                             for name, value in (run.get("breaking") or {}).items()) or "-"
        memory = _fmt(run["peak_memory_mb"], ".0f")
        if run.get("peak_gpu_memory_mb") is not None:
            memory += f" (GPU {run['peak_gpu_memory_mb']:.0f})"
        lines.append(
            f"| {run['name']} | ok | {pair('force_mae_mev_per_a')} | {pair('force_rmse_mev_per_a')} "
            f"| {pair('energy_mae_mev_per_atom', '.2f')} | {_fmt(eq[0], '.1e')} / {_fmt(eq[1], '.1e')} "
            f"| {_fmt(run['model_epoch'], 'd')} | {gamma} | {breaking} | {_fmt(run['seconds_per_epoch'], '.2f')} "
            f"| {memory} |"
        )
    return "\n".join(lines)


def _common_prefix(names: list[str]) -> str:
    """The dotted prefix every layer name shares (``model.func.``), left out of the table."""
    if len(set(names)) < 2:
        return ""
    parts = [name.split(".") for name in names]
    shared = []
    for pieces in zip(*parts):
        if len(set(pieces)) > 1:
            break
        shared.append(pieces[0])
    return ".".join(shared) + "." if shared else ""


def reading(results: dict) -> list[str]:
    """A few plain sentences on what the table says, computed from it."""
    runs = {run["name"]: run for run in results["runs"]}
    ok = [run for run in results["runs"] if run["status"] == "ok"]
    lines = []
    failed = [run for run in results["runs"] if run["status"] != "ok"]
    for run in failed:
        lines.append(f"`{run['name']}` failed ({run['error']}); its log is `{run['directory']}/output.log`.")
    if not ok:
        return lines + ["No run finished, so there is nothing to compare."]
    vanilla = runs.get("vanilla")
    base = _metric(vanilla, "equivariant", "force_mae_mev_per_a") if vanilla and vanilla["status"] == "ok" else None
    candidates = [(_metric(run, model, "force_mae_mev_per_a"), run["name"], model)
                  for run in ok for model in ("equivariant", "relaxed") if run["test"].get(model)]
    candidates = [c for c in candidates if c[0] is not None]
    if candidates:
        best = min(candidates)
        which = "model" if best[1] == "vanilla" else f"{best[2]} model"
        lines.append(f"Lowest test force MAE: `{best[1]}` ({which}), {best[0]:.1f} meV/Å.")
    if base is not None:
        lines.append(f"Vanilla {results['host']} training: test force MAE {base:.1f} meV/Å.")
        for model, label in (("relaxed", "Relaxed models"), ("equivariant", "Exported (exactly equivariant) models")):
            rows = [(run["name"], _metric(run, model, "force_mae_mev_per_a")) for run in ok if run["relaxed_run"]]
            rows = [(name, value) for name, value in rows if value is not None]
            if not rows:
                continue
            lines.append(_against(f"{label} vs vanilla", rows, base, "below vanilla", "not below vanilla"))
        for baseline in [run for run in ok if not run["relaxed_run"] and run["name"] != "vanilla"]:
            value = _metric(baseline, "equivariant", "force_mae_mev_per_a")
            if value is None:
                continue
            what = (results.get("baselines") or {}).get(baseline["name"])
            lines.append(f"Baseline `{baseline['name']}`{f' ({what})' if what else ''}: test force MAE {value:.1f} "
                         f"meV/Å ({100 * (value / base - 1):+.1f}% vs vanilla).")
            rows = [(run["name"], _metric(run, "relaxed", "force_mae_mev_per_a")) for run in ok if run["relaxed_run"]]
            rows = [(name, v) for name, v in rows if v is not None]
            if rows:
                lines.append(_against(f"Relaxed models vs `{baseline['name']}`", rows, value, "below", "not below"))
        winners = [run["name"] for run in ok if run["relaxed_run"]
                   and (_metric(run, "relaxed", "force_mae_mev_per_a") or math.inf) < base]
        if not winners:
            lines.append("No relaxed run beat vanilla on test force MAE with this budget.")
    exported = [(run["test"]["equivariant"].get("equivariance_error") or {}).get("forces")
                for run in ok if run["test"].get("equivariant")]
    exported = [e for e in exported if e is not None]
    if exported:
        lines.append(f"Every equivariant model (vanilla, exported) is equivariant to {max(exported):.1e} "
                     "(largest relative force error under 3 random O(3) rotations).")
    kept, closed = [], []
    for run in ok:
        if run["gamma"]:
            largest = max(abs(g) for g in run["gamma"].values())
            (kept if largest > 1e-3 else closed).append(f"`{run['name']}` (max |γ| {largest:.3f})")
    if closed:
        lines.append(f"Ended exactly equivariant (γ ≈ 0 on every layer): {', '.join(closed)}.")
    for run in ok:  # controllers that close by the end of the run, saved by the host before it
        epochs, saved = results.get("epochs"), run.get("model_epoch")
        if run.get("controller") not in ("cr", "ace") or not run["gamma"] or not epochs or saved is None \
                or saved >= epochs:
            continue
        level = max(abs(g) for g in run["gamma"].values())
        if run["controller"] == "cr":
            at, end = f"at θ = {level:.2f}", "the schedule ended (θ = 0"
        else:
            at, end = f"at |γ| up to {level:.2f}", "the controller closed (γ = 0"
        lines.append(f"`{run['name']}`: the host kept its epoch-{saved} model ({_saved_model(results)}), {at}, "
                     f"before {end} at epoch {epochs}); its exported model is that model's projection.")
    if kept:
        lines.append(f"Ended with γ > 0 somewhere (still relaxed; the exported model is their equivariant "
                     f"projection): {', '.join(kept)}.")
    return lines


def _against(head: str, rows: list, reference: float, below_label: str, above_label: str) -> str:
    """One sentence: which ``(name, force MAE)`` rows are below ``reference`` and which are not, with margins."""
    below = [f"`{n}` ({100 * (v / reference - 1):+.1f}%)" for n, v in rows if v < reference]
    above = [f"`{n}` ({100 * (v / reference - 1):+.1f}%)" for n, v in rows if v >= reference]
    return f"{head}: {below_label}: {', '.join(below) or 'none'}" + (f"; {above_label}: {', '.join(above)}."
                                                                       if above else ".")


def _saved_model(results: dict) -> str:
    return results.get("saved_model") or "lowest validation loss"


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plots = _plots(results, out)
    lines = [
        f"# equirelax compare: {results['host']}",
        "",
        f"Config `{results['config']}`, {results['epochs']} epochs, seed {results['seed']}; test set "
        f"`{results['test_file']}` ({results['test_configurations']} configurations). "
        "\"equivariant\" is the vanilla model or a relaxed run's exported model (branches merged), "
        "\"relaxed\" the model with its branches. Equivariance error: largest relative force error under "
        f"3 random O(3) rotations. Every model is the one the host saved ({_saved_model(results)}), trained for "
        "\"model epoch\" epochs; γ is that model's. "
        "Time: median training seconds per epoch (validation excluded).",
        "",
        table(results),
        "",
        "## Reading",
        "",
        *[f"- {line}" for line in reading(results)],
        "",
    ]
    if plots:
        lines += ["## Plots", "", *[f"![{name}]({name})" for name in plots], ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def _plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    ok = [run for run in results["runs"] if run["status"] == "ok"]
    figure, axis = plt.subplots(figsize=(6, 4))
    for run in ok:
        points = [(e, v) for e, v in zip(run["curves"].get("epoch", []), run["curves"].get("val_force_mae", []))
                  if v is not None]
        if points:
            axis.plot(*zip(*points), marker=".", label=run["name"])
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation force MAE (meV/Å)")
    axis.set_title("validation curves")
    if axis.lines:
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "validation.png", dpi=100)
    plt.close(figure)
    written.append("validation.png")

    relaxed = [run for run in ok if run["curves"].get("gamma")]
    if relaxed:
        # top row γ, bottom row the symmetry map ‖γ·P⊥f_neq‖ / ‖f_eq‖ (what γ means for the layer's output)
        figure, axes = plt.subplots(2, len(relaxed), figsize=(3.2 * len(relaxed), 6.0), squeeze=False, sharey="row")
        for column, run in enumerate(relaxed):
            for row, quantity in enumerate(("gamma", "breaking")):
                axis = axes[row][column]
                for layer, points in (run["curves"].get(quantity) or {}).items():
                    axis.plot(*zip(*points), marker=".", label=layer)
                axis.set_xlabel("epoch")
            axes[0][column].set_title(run["name"])
        axes[0][0].set_ylabel("γ")
        axes[1][0].set_ylabel("symmetry breaking")
        axes[0][-1].legend(fontsize="x-small")
        figure.tight_layout()
        figure.savefig(out / "gamma.png", dpi=100)
        plt.close(figure)
        written.append("gamma.png")
    return written


