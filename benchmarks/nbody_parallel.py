"""``nbody.py``'s table as parallel processes on one device (a GPU, where one small model's steps leave the card
mostly idle): one ``nbody.py`` run per (data set, controller, seed), merged into one table.

    python benchmarks/nbody_parallel.py --device cuda --seconds 420 --out nbody-gpu -- \\
        --model steerable --setup ace-reference --data egnn --train 3000 --test 1000 --epochs 1000 \\
        --seeds 0 1 2 --kinds symmetric --cache nbody-cache

Arguments after ``--`` are ``nbody.py``'s. ``--seconds``: the wall time the runs may take. A calibration (every
run at once, ``--calibration-epochs`` epochs) measures the seconds per epoch under that load, and the epochs
are cut to what fits, never above ``--epochs``. Every run gets the same epochs, and the table's title states
them. Writes ``results.json``, ``table.md``, ``gamma.png`` and ``validation.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbody

HERE = Path(__file__).resolve().parent


def command(run_args, kind, name, seed, epochs, device, out: Path):
    argv = [sys.executable, str(HERE / "nbody.py"), "--model", run_args.model, "--setup", run_args.setup,
            "--data", run_args.data, "--train", str(run_args.train), "--test", str(run_args.test),
            "--epochs", str(epochs), "--seeds", str(seed), "--kinds", kind, "--controllers", name,
            "--threads", "1", "--device", device, "--out", str(out)]
    argv += ["--controller-options", json.dumps(run_args.controller_options)]
    return argv + (["--cache", str(run_args.cache)] if run_args.cache else [])


def run_all(runs, run_args, epochs, device, work: Path):
    """Start every run at once, wait for all; their results, or an error with the failed run's log."""
    processes = []
    for kind, name, seed in runs:
        out = work / f"{kind}-{name}-{seed}"
        out.mkdir(parents=True, exist_ok=True)
        with (out / "log").open("w") as log:   # the child keeps its own descriptor
            processes.append((out, subprocess.Popen(command(run_args, kind, name, seed, epochs, device, out),
                                                    stdout=log, stderr=subprocess.STDOUT)))
    failed = [out for out, process in processes if process.wait() != 0]
    if failed:
        raise SystemExit(f"equirelax: {len(failed)} run(s) failed; the first's log ({failed[0]}):\n"
                         + (failed[0] / "log").read_text()[-4000:])
    return [json.loads((out / "results.json").read_text())["results"] for out, _ in processes]


def epochs_that_fit(seconds: float, per_epoch: float, overhead: float, asked: int) -> int:
    """The most epochs (≤ ``asked``) that fit in ``seconds`` after ``overhead``, with a 10% margin."""
    return max(min(asked, int(0.9 * (seconds - overhead) / per_epoch)), 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seconds", type=float, required=True, help="wall time the runs may take")
    parser.add_argument("--calibration-epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("nbody-parallel"))
    parser.add_argument("nbody_args", nargs=argparse.REMAINDER, help="-- then nbody.py's arguments")
    args = parser.parse_args(argv)
    run_args = nbody.arguments().parse_args([a for a in args.nbody_args if a != "--"])
    runs = [(kind, name, seed) for kind in run_args.kinds
            for name in nbody.runs_for(run_args.controllers, kind, run_args.model) for seed in run_args.seeds]
    if run_args.data == "egnn" and run_args.cache:   # made once here, so the runs only read it
        for kind in run_args.kinds:
            nbody.egnn_splits(tuple(nbody.FIELD) if kind == "field" else None,
                              max(run_args.train, run_args.test), run_args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        calibration = run_all(runs, run_args, args.calibration_epochs, args.device, Path(work) / "calibration")
        wall = time.perf_counter() - start
        per_epoch = max(r[k][n][0]["seconds_per_epoch"] for r in calibration for k in r for n in r[k])
        overhead = max(wall - args.calibration_epochs * per_epoch, 0.0)   # start-up, data, evaluation
        epochs = epochs_that_fit(args.seconds, per_epoch, overhead, run_args.epochs)
        print(f"calibration: {len(runs)} runs at once, {per_epoch:.3f} s per epoch (slowest), {overhead:.0f} s "
              f"start-up and evaluation; running {epochs} epochs (asked {run_args.epochs})", flush=True)
        if epochs < 1:
            raise SystemExit("equirelax: not one epoch fits in --seconds")
        start = time.perf_counter()
        finished = run_all(runs, run_args, epochs, args.device, Path(work) / "runs")
        print(f"runs: {time.perf_counter() - start:.0f} s", flush=True)
    results = {}
    for (kind, name, _), result in zip(runs, finished):
        results.setdefault(kind, {}).setdefault(name, []).extend(result[kind][name])
    title = (f"# N-body, {run_args.model} ({run_args.setup} setup), {run_args.data} data: {run_args.train} "
             f"training systems, {run_args.test} test, {epochs} epochs, seeds {run_args.seeds}, {args.device}, "
             f"{len(runs)} runs at once")
    text = "\n\n".join([title] + [nbody.table(results, kind) for kind in results]) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"epochs": epochs, "calibration_seconds_per_epoch": per_epoch,
                                                       "nbody_args": vars(run_args) | {"cache": str(run_args.cache),
                                                                                        "out": None},
                                                       "results": results}))
    nbody.plots(results, args.out)
    print(text)


if __name__ == "__main__":
    main()
