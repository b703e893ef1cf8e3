"""``python -m equirelax.plugins.mace``: the same as ``equirelax-mace-train``."""

from .training import main

main()
