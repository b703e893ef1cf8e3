"""The one place equirelax imports e3nn.

e3nn 0.4.4 (pinned by mace-torch) loads its constants with ``torch.load`` at
import time, which torch >= 2.6 refuses by default (``weights_only``). MACE sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` globally when it is imported; here the
variable is set only for the duration of e3nn's own import and then restored,
so importing equirelax first does not change how the user's ``torch.load`` behaves.
"""

import os
import sys
import warnings

_FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _import_o3():
    try:
        from e3nn import o3  # noqa: PLC0415

        return o3
    except Exception as first_error:  # noqa: BLE001
        if "weights_only" not in str(first_error) and "Weights only" not in str(first_error):
            raise
    for name in [m for m in sys.modules if m == "e3nn" or m.startswith("e3nn.")]:
        del sys.modules[name]
    previous = os.environ.get(_FLAG)
    os.environ[_FLAG] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from e3nn import o3  # noqa: PLC0415
    finally:
        if previous is None:
            del os.environ[_FLAG]
        else:
            os.environ[_FLAG] = previous
    return o3


o3 = _import_o3()
import e3nn  # noqa: E402  (already imported above; gives the version)

E3NN_VERSION = e3nn.__version__
