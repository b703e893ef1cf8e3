"""SevenNet host.

    checkpoint.py  a relaxed SevenNet model written back as a plain SevenNet checkpoint (``SevenNetCalculator``,
                   ``sevenn_get_model``, fine-tuning), with no equirelax needed to load it
"""

from .checkpoint import export_checkpoint

__all__ = ["export_checkpoint"]
