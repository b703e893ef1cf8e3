"""``equirelax compare``: vanilla vs relaxed host training on one config, evaluated the same way, one report.

    engine.py  runs the host's training per controller (through the host interface) and evaluates the models
    report.py  the table, the reading and the plots, from the results alone
"""

from .engine import DEFAULT_CONTROLLERS, CompareError, Run, compare
from .engine import __doc__ as USAGE
from .report import reading, table, write_report

__all__ = ["DEFAULT_CONTROLLERS", "USAGE", "CompareError", "Run", "compare", "reading", "table", "write_report"]
