"""``torchrun ... mace_rank_state.py OUT_DIR <equirelax-mace-train arguments>``: equirelax-mace-train, with every
rank saving its model state (weights, γ, controller buffers) to OUT_DIR/rank<r>.pt when training ends."""

import os
import sys

import torch

import mace  # noqa: F401
import mace.tools as tools
from equirelax.plugins import mace as plugin


def main(out_dir, argv):
    original = tools.train

    def train(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.pt"))
        return result

    tools.train = train
    plugin.main(argv)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
