"""SevenNet host.

    training.py    ``equirelax-sevenn``: sevenn's own training with the ``relax:`` section of ``input.yaml``
    host.py        how compare trains and evaluates a sevenn input.yaml
    checkpoint.py  a relaxed SevenNet model written back as a plain SevenNet checkpoint (``SevenNetCalculator``,
                   ``sevenn_get_model``, fine-tuning), with no equirelax needed to load it
"""

from .checkpoint import export_checkpoint

__all__ = ["export_checkpoint"]
