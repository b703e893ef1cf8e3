"""NequIP's own model test suite (``nequip.utils.unittests``) on relaxed and exported models.

The relaxed model has random, non-zero branch weights held at γ = 0: NequIP's
equivariance, gradient, smoothness and batching tests must pass exactly as for
NequIP's own model. The exported model has a γ ≠ 0 branch merged into its weights.
"""

import pytest

pytest.importorskip("nequip")

from nequip.utils.unittests.conftest import *  # noqa: E402,F401,F403  (NequIP's fixtures: molecules, bulk, dtypes)
from nequip.utils.unittests.model_tests_basic import EnergyModelTestsMixin  # noqa: E402

TYPE_NAMES = ["H", "C", "O", "Cu"]  # NequIP's tests read them from the top of the config
NEQUIP_MODEL = {
    "_target_": "nequip.model.NequIPGNNModel",
    "seed": 123,
    "r_max": 4.0,
    "avg_num_neighbors": 20,
    "num_layers": 2,
    "l_max": 1,
    "num_features": 8,
    "radial_mlp_depth": 1,
    "radial_mlp_width": 8,
}


class TestRelaxedAtGammaZero(EnergyModelTestsMixin):
    @pytest.fixture(scope="class")
    @classmethod
    def config(cls):
        return {"_target_": "equirelax.plugins.nequip.RelaxedModel", "controller": "fixed",
                "options": {"gamma": 0.0}, "init": "random", "init_std": 0.3, "type_names": TYPE_NAMES,
                "model": dict(NEQUIP_MODEL)}

    @pytest.fixture
    def strict_locality(self):
        return False


class TestExported(EnergyModelTestsMixin):
    @pytest.fixture(scope="class")
    @classmethod
    def config(cls):
        relaxed = {"_target_": "equirelax.plugins.nequip.RelaxedModel", "controller": "fixed",
                   "options": {"gamma": 0.7}, "init": "random", "init_std": 0.3, "model": dict(NEQUIP_MODEL)}
        return {"_target_": "equirelax.plugins.nequip.ExportedModel", "type_names": TYPE_NAMES, "model": relaxed}

    @pytest.fixture
    def strict_locality(self):
        return False
