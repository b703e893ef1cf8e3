"""``equirelax compare``: vanilla vs relaxed host training on the same data, seed and budget, one report.

    equirelax compare --host HOST --config YOUR_HOST_CONFIG.yaml --out compare-output
    equirelax compare --host HOST --config YOUR_HOST_CONFIG.yaml --controllers vanilla recm ace-resilient

For every entry of ``--controllers`` (default: vanilla cr ace ace-resilient
recm) the host's own training runs on the user's config, unchanged except for
the relaxation: ``vanilla`` is the config as it is (its relax settings
removed), a host's baseline (``Host.baselines``, e.g. its own LoRA fine-tuning) is
the config with that baseline on, every other entry adds the relaxation with that
controller (the config's own relax settings, e.g. branch or targets, are kept). Each run lives
in ``OUT/runs/<name>/`` with the host's usual outputs and ``output.log``. Then
every resulting model is evaluated the same way on the test set (the config's
own, or ``--test-file``): energy and force MAE/RMSE of the equivariant model
(vanilla, or the relaxed run's exported model, branches merged) and of the
relaxed model, their equivariance error under random O(3) rotations, the final
γ per layer, training time per epoch and peak memory. Written to ``OUT``:

    report.md       table and a short reading of the result
    results.json    every number of the table, plus the per-epoch curves
    validation.png  validation force MAE per epoch, every run
    gamma.png       γ and the symmetry breaking per layer over training, every relaxed run

With ``--seeds 0 1 2`` the whole comparison runs once per seed (``OUT/seed<s>/``,
each with the files above) and ``OUT/report.md`` gives every number as mean ±
std over seeds with a paired verdict against vanilla per seed
(``equirelax.compare.seeds``).

A run that fails is reported in the table with its error; the others go on. The
exit status is 1 when a run failed, 0 otherwise. Relative paths in the config
are taken from the directory ``compare`` is run in. Hosts are plugins
(entry-point group ``equirelax.hosts``); ``--host`` lists the installed ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.hosts import HostConfigError, HostOptions, get_host
from .report import write_report

DEFAULT_CONTROLLERS = ("vanilla", "cr", "ace", "ace-resilient", "recm")

CompareError = HostConfigError  # a host refusing its config is the same early stop


@dataclass
class Run:
    name: str
    controller: str | None  # None: vanilla host training
    directory: Path
    options: dict = field(default_factory=dict)  # the controller's options
    status: str = "pending"
    error: str | None = None
    wall_seconds: float | None = None
    seconds_per_epoch: float | None = None
    peak_memory_mb: float | None = None
    peak_gpu_memory_mb: float | None = None
    gamma: dict = field(default_factory=dict)
    breaking: dict = field(default_factory=dict)  # the symmetry map on the test set: ‖γ·P⊥f_neq‖ / ‖f_eq‖ per layer
    model_epoch: int | None = None  # epochs trained by the evaluated (host's saved) model
    test: dict = field(default_factory=dict)  # {"equivariant": metrics, "relaxed": metrics}
    curves: dict = field(default_factory=dict)

    @property
    def relaxed(self) -> bool:
        return self.controller is not None


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _read_reference(frames, energy_key: str, forces_key: str):
    import numpy as np

    energies, forces = [], []
    for i, atoms in enumerate(frames):
        if energy_key in atoms.info:
            energies.append(float(atoms.info[energy_key]))
        elif atoms.calc is not None:
            energies.append(float(atoms.get_potential_energy()))
        else:
            raise CompareError(f"equirelax: test configuration {i} has no energy under {energy_key!r}")
        if forces_key in atoms.arrays:
            forces.append(np.asarray(atoms.arrays[forces_key], dtype=float))
        elif atoms.calc is not None:
            forces.append(np.asarray(atoms.get_forces(), dtype=float))
        else:
            raise CompareError(f"equirelax: test configuration {i} has no forces under {forces_key!r}")
    return energies, forces


# ----------------------------------------------------------------------- running
def _stream(command: list[str], directory: Path, quiet: bool) -> int:
    """Run ``command`` in ``directory``, its output to ``output.log`` and (unless quiet) the terminal."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(directory / "output.log", "wb") as log:
        process = subprocess.Popen(command, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            log.write(chunk)
            if not quiet:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        return process.wait()


def _failure_message(directory: Path, returncode: int) -> str:
    text = (directory / "output.log").read_text(errors="replace") if (directory / "output.log").exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("equirelax:")]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    detail = (ours or errors or lines or ["no output"])[-1]
    return f"exit code {returncode}: {detail[:300]}"


def _evaluate(host, model, frames, reference) -> dict:
    import numpy as np

    energies, forces, equivariance = host.predict(model, frames)
    ref_energies, ref_forces = reference
    per_atom = np.array([(e - r) / len(f) for e, r, f in zip(energies, ref_energies, ref_forces)])
    force_error = np.concatenate([(p - r).ravel() for p, r in zip(forces, ref_forces)])
    return {
        "energy_mae_mev_per_atom": float(1000 * np.abs(per_atom).mean()),
        "energy_rmse_mev_per_atom": float(1000 * np.sqrt((per_atom**2).mean())),
        "force_mae_mev_per_a": float(1000 * np.abs(force_error).mean()),
        "force_rmse_mev_per_a": float(1000 * np.sqrt((force_error**2).mean())),
        "equivariance_error": equivariance,
    }


def _finish(host, run: Run, frames, reference) -> None:
    import statistics

    epochs_record = run.directory / "epochs.json"
    if epochs_record.exists():
        seconds = json.loads(epochs_record.read_text()).get("epoch_seconds") or []
        if seconds:
            run.seconds_per_epoch = statistics.median(seconds)
    resources = run.directory / "resources.json"
    if resources.exists():
        record = json.loads(resources.read_text())
        run.peak_memory_mb, run.peak_gpu_memory_mb = record.get("peak_rss_mb"), record.get("peak_gpu_mb")
    run.curves = host.curves(run)
    equivariant, relaxed = host.models(run)
    run.test["equivariant"] = _evaluate(host, equivariant, frames, reference)
    if relaxed is not None:
        from ..core.metrics import symmetry_breaking

        with symmetry_breaking(relaxed) as breaking:
            run.test["relaxed"] = _evaluate(host, relaxed, frames, reference)
        from ..core.handle import RelaxHandle

        handle = RelaxHandle.attach(relaxed)
        names = handle.short_names()  # the layers as the run's logs name them
        run.gamma = {names[name]: value for name, value in handle.levels().items()}
        run.breaking = {names.get(name, name): value for name, value in breaking.items()}


def compare(host_name: str, config_path: Path, out: Path, controllers=DEFAULT_CONTROLLERS, *, epochs=None,
            seed=None, test_file=None, controller_options=None, device=None, quiet=False) -> dict:
    """Run and evaluate every controller; write the report. Returns the results dict."""
    from ase.io import read

    host_class = get_host(host_name)
    controllers = list(controllers)
    if not controllers:
        raise CompareError("equirelax: --controllers needs at least one entry")
    duplicates = sorted({c for c in controllers if controllers.count(c) > 1})
    if duplicates:
        raise CompareError(f"equirelax: controller(s) {duplicates} listed twice")
    controller_options = dict(controller_options or {})
    unknown = sorted(set(controller_options) - set(controllers))
    if unknown:
        raise CompareError(f"equirelax: --controller-options names {unknown}, which are not in --controllers")
    if "vanilla" in controller_options:
        raise CompareError("equirelax: --controller-options: vanilla is the host's own training and takes no options")
    options = HostOptions(epochs=epochs, seed=seed, test_file=test_file, device=device)
    host = host_class(Path(config_path), options)
    own_test_set = None if host.test_file else host.own_test_set()
    if not host.test_file and own_test_set is None:
        raise CompareError("equirelax: compare evaluates on a test set: give the config one "
                           f"({host.test_file_key}) or pass --test-file")
    test_path = None
    if host.test_file:
        test_path = Path(host.test_file)
        test_path = test_path if test_path.is_absolute() else Path.cwd() / test_path
        if not test_path.is_file():
            raise CompareError(f"equirelax: no test file at {test_path} (relative paths in the config are taken "
                               "from the directory compare runs in)")
    baselines = dict(getattr(host_class, "baselines", {}) or {})
    if set(controller_options) & set(baselines):
        raise CompareError(f"equirelax: --controller-options: {sorted(set(controller_options) & set(baselines))} "
                           f"is a {host_name} baseline, configured in the config itself, and takes no options")
    for controller in controllers:  # unknown controllers and bad options stop here, before any training
        if controller != "vanilla" and controller not in baselines:
            if not isinstance(controller_options.get(controller, {}), dict):
                raise CompareError(f"equirelax: --controller-options for {controller!r} must be a mapping")
            try:
                host.check(controller, controller_options.get(controller, {}))
            except (ValueError, TypeError, KeyError) as error:
                message = str(error).strip("'\"")
                raise CompareError(message if message.startswith("equirelax") else
                                   f"equirelax: controller {controller!r}: {message}") from None
    host.check_inputs()  # a config problem every run would hit stops compare here, before the first run
    if host.package is not None and importlib.util.find_spec(host.package) is None:
        raise CompareError(f"equirelax: compare --host {host_name} needs {host.package} in this environment: "
                           f"pip install 'equirelax[{host.extra or host_name}]'")
    frames = read(str(test_path), ":") if test_path is not None else host.own_test_frames()
    if not frames:
        raise CompareError(f"equirelax: the test set ({test_path or own_test_set}) holds no configuration")
    reference = _read_reference(frames, host.energy_key, host.forces_key)

    out = Path(out).resolve()
    runs = []
    for index, controller in enumerate(controllers, 1):
        directory = out / "runs" / re.sub(r"[^A-Za-z0-9_.-]", "_", controller)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        relaxing = controller != "vanilla" and controller not in baselines
        run = Run(controller, controller if relaxing else None, directory,
                  options=controller_options.get(controller, {}))
        runs.append(run)
        print(f"equirelax compare [{index}/{len(controllers)}] {controller}: {host_name} training "
              f"(log: {directory / 'output.log'})", flush=True)
        start = time.perf_counter()
        try:
            returncode = _stream(host.command(run), directory, quiet)
        except OSError as error:
            returncode, run.error = -1, f"could not start: {error}"
        run.wall_seconds = time.perf_counter() - start
        if returncode != 0:
            run.status = "failed"
            run.error = run.error or _failure_message(directory, returncode)
            print(f"equirelax compare: {controller} failed ({run.error})", flush=True)
            continue
        try:
            _finish(host, run, frames, reference)
            run.status = "ok"
        except Exception as error:  # noqa: BLE001  (one run's evaluation failing must not lose the others)
            run.status = "failed"
            run.error = f"evaluation: {type(error).__name__}: {error}"
            print(f"equirelax compare: evaluating {controller} failed ({run.error})", flush=True)

    results = {
        "host": host_name, "config": str(Path(config_path).resolve()), "test_file": str(test_path) if test_path is not None else own_test_set,
        "test_configurations": len(frames), "epochs": host.epochs, "seed": host.seed,
        "saved_model": host.saved_model,
        "baselines": {name: text for name, text in baselines.items() if name in controllers},
        "controllers": controllers, "controller_options": controller_options,
        "runs": [_json_run(run) for run in runs],
    }
    write_report(results, out)
    return results


def compare_seeds(host_name: str, config_path: Path, out: Path, controllers=DEFAULT_CONTROLLERS, *, seeds,
                  **options) -> dict:
    """``compare`` once per seed (``OUT/seed<s>/``), then the mean ± std report over seeds (``OUT/report.md``)."""
    from .seeds import write_seeds_report

    seeds = list(seeds)
    if not seeds:
        raise CompareError("equirelax: --seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"equirelax: --seeds lists a seed twice: {seeds}")
    if options.get("seed") is not None:
        raise CompareError("equirelax: give --seed or --seeds, not both")
    options.pop("seed", None)
    out = Path(out).resolve()
    per_seed = {}
    for seed in seeds:
        print(f"equirelax compare: seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})", flush=True)
        per_seed[seed] = compare(host_name, config_path, out / f"seed{seed}", controllers, seed=seed, **options)
    return {**write_seeds_report(per_seed, out, host_name), "per_seed_results": per_seed}


def _json_run(run: Run) -> dict:
    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return _finite_or_none(node)

    record = asdict(run)
    record["directory"] = str(run.directory)
    record["relaxed_run"] = run.relaxed
    return clean(record)
