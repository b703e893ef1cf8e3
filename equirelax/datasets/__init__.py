"""Generated data, deterministic by seed, no downloads.

    emt.py        Cu/Al clusters labelled with ASE's EMT, symmetric or in a uniform external field (extxyz)
    nbody.py      charged N-body systems, optionally in an external field, and their EGNN graphs
    synthetic.py  small e3nn regression tasks (symmetric or field) and the gated e3nn model fit to them
"""
