"""Shared by the host speed benchmarks: every variant timed interleaved, medians of repeats, one table.

``variants`` maps a label (``"vanilla"`` first) to ``(model, handle or None)``;
``loss`` computes a training loss from a model, ``infer`` runs inference.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch

import equirelax

# the budget controllers pace themselves by; a timing run takes only a few of its steps. 10000 is the longest at
# which RECM probes every 4th step, its costliest (longer runs probe about 2500 times in all); no other
# controller's step depends on it
TIMING_BUDGET = 10_000
# the host benchmarks' rows: (label, controller, options), every controller at its defaults
CONTROLLERS = [("vanilla", None, {}), ("fixed", "fixed", {}), ("cr", "cr", {"epochs": 10}), ("ace", "ace", {}),
               ("ace-resilient", "ace-resilient", {}), ("recm", "recm", {})]


def add_controllers_option(parser):
    parser.add_argument("--controllers", nargs="+",
                        choices=[label for label, controller, _ in CONTROLLERS if controller],
                        help="only these rows besides vanilla (e.g. fixed ace-resilient)")
    parser.add_argument("--controller-options", type=json.loads, default={},
                        help='a further row per controller with these options, '
                             'e.g. \'{"recm": {"allowance": "rows"}}\'')


def option_rows(rows, extra: dict | None, only=None) -> list:
    """The rows of ``rows`` that ``extra`` ({row label: options}, ``--controller-options``) names, again, with
    those options added and labelled with them (``only``: of just these labels); a name that is no row raises."""
    known = {name: (controller, defaults) for name, controller, defaults in rows if controller}
    added = []
    for label, options in (extra or {}).items():
        if label not in known:
            raise ValueError(f"--controller-options names {label!r}; the rows are {sorted(known)}")
        if not only or label in only:
            controller, defaults = known[label]
            added.append((f"{label} {json.dumps(options)}", controller, {**defaults, **options}))
    return added


def relaxed_variants(base, relax, only=None, rows=CONTROLLERS, extra=None) -> dict:
    """``{label: (model, handle or None)}``: a deep copy of ``base`` per row of ``rows`` (``only``: just these
    besides vanilla), relaxed by ``relax(model, controller, options)``; ``extra`` adds rows (``option_rows``)."""
    rows = [row for row in rows if not row[1] or not only or row[0] in only] + option_rows(rows, extra, only)
    variants = {}
    for label, controller, options in rows:
        model = copy.deepcopy(base)
        variants[label] = (model, relax(model, controller, options) if controller else None)
    return variants


def device_sync(device: str):
    """What a timer waits on before reading the clock: the device's queued kernels (nothing on the CPU)."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def seconds_per_step(step, steps: int, sync, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()  # queued device work belongs to the timed steps
    return (time.perf_counter() - start) / steps


def training_step(model, handle, loss):
    """One host training step as a callable: forward (forces by autograd), loss, backward, Adam step; the
    controller in its hooks."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    if handle:
        handle.wrap(opt)
    model.train()

    def step():
        opt.zero_grad()
        loss(model).backward()
        opt.step()

    return step


def train_time(model, handle, loss, steps: int, sync) -> float:
    return seconds_per_step(training_step(model, handle, loss), steps, sync)


def inference_time(model, infer, steps: int, sync) -> float:
    model.eval()
    return seconds_per_step(lambda: infer(model), steps, sync)


def time_variants(variants: dict, loss, infer, repeats: int, steps: int, sync=lambda: None):
    """``(train, infer)``: per-variant lists of seconds per step; inference on each variant's exported model."""
    train = {label: [] for label in variants}
    for _ in range(repeats):
        for label, (model, handle) in variants.items():
            train[label].append(train_time(model, handle, loss, steps, sync))
    # every variant deep-copied alike (e3nn rebuilds its generated code on copy)
    exported = {label: equirelax.export(copy.deepcopy(model)) if handle else copy.deepcopy(model)
                for label, (model, handle) in variants.items()}
    inference = {label: [] for label in variants}
    for _ in range(repeats):
        for label, model in exported.items():
            inference[label].append(inference_time(model, infer, steps, sync))
    return train, inference


def print_table(train: dict, inference: dict):
    print("| model | train step (ms) | relaxed / vanilla | exported inference (ms) | exported / vanilla |")
    print("|---|---|---|---|---|")
    t0, i0 = statistics.median(train["vanilla"]), statistics.median(inference["vanilla"])
    for label in train:
        t, i = statistics.median(train[label]), statistics.median(inference[label])
        print(f"| {label} | {1000 * t:.1f} | {t / t0:.3f} | {1000 * i:.1f} | {i / i0:.3f} |")
