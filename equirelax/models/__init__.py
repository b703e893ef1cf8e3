"""Reference models that no package ships, for the N-body benchmarks.

    egnn.py             EGNN of Satorras et al. (velocity variant), relaxed through ``equirelax.adapters.egnn``
    steerable_nbody.py  a SEGNN-style e3nn network, relaxed through the generic e3nn adapter
"""
