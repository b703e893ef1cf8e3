"""``equirelax compare``: vanilla vs relaxed host training on one config, evaluated the same way, one report.

    engine.py  runs the host's training per controller (through the host interface) and evaluates the models
    report.py  the table, the reading and the plots, from the results alone
    seeds.py   several seeds: mean ± std and the paired verdict against vanilla, from the per-seed results
"""

from .engine import DEFAULT_CONTROLLERS, CompareError, Run, compare, compare_seeds
from .engine import __doc__ as USAGE
from .report import reading, table, write_report
from .seeds import aggregate, seeds_reading, seeds_table

__all__ = ["DEFAULT_CONTROLLERS", "USAGE", "CompareError", "Run", "aggregate", "compare", "compare_seeds", "reading",
           "seeds_reading", "seeds_table", "table", "write_report"]
