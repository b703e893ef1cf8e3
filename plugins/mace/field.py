"""``field_input``: a MACE run whose model is given each structure's external field as an equivariant input
(``equirelax.adapters.mace.add_field_input``), with MACE's own data loading, training and saving."""

from __future__ import annotations

import contextlib
import logging
import sys

from .config import FIELD_KEY


@contextlib.contextmanager
def field_input_setup(args, field_key: str | None):
    """``field_input``: MACE's loaders read each structure's field (extxyz info ``field_key``) into the batch's
    ``external_field``, and the model built or loaded for the run gets it as an equivariant input
    (``adapters.mace.add_field_input``). Nothing changes without it."""
    if field_key is None:
        yield
        return
    from mace.cli import run_train

    from ...adapters.mace import add_field_input

    _check_field_data(args, field_key)
    original_keyspec, original_configure = run_train.update_keyspec_from_kwargs, run_train.configure_model

    def update_keyspec_from_kwargs(keyspec, keydict):
        return original_keyspec(keyspec, keydict).update(info_keys={FIELD_KEY: field_key})

    def configure_model(*a, **k):
        model, output_args = original_configure(*a, **k)
        add_field_input(model)
        logging.info(f"equirelax: field_input: the model reads each structure's field (info {field_key!r}) as an "
                     "equivariant input, coupled to the first product's 1o channels (weights start at zero)")
        return model, output_args

    run_train.update_keyspec_from_kwargs, run_train.configure_model = update_keyspec_from_kwargs, configure_model
    try:
        yield
    finally:
        run_train.update_keyspec_from_kwargs, run_train.configure_model = original_keyspec, original_configure


def _check_field_data(args, field_key: str) -> None:
    if getattr(args, "enable_cueq", False) or getattr(args, "only_cueq", False) or getattr(args, "enable_oeq", False):
        sys.exit("equirelax: --enable_cueq/--enable_oeq rebuild MACE's model with accelerated kernels, which would "
                 "drop the field input; train it without them")
    train_file = getattr(args, "train_file", None)
    if not isinstance(train_file, str) or not train_file.endswith((".xyz", ".extxyz")):
        return
    from ase.io import read

    if field_key not in read(train_file, 0).info:
        sys.exit(f"equirelax: field_input reads each structure's field from its extxyz info {field_key!r}, and the "
                 f"first structure of {train_file} has none: write the field there (equirelax data emt-field "
                 "does), or name the key that holds it (field_input: {key: <info key>})")
