"""``python kill_at_step.py N mace|nequip|sevenn <host CLI arguments>``: the host's training CLI, killed with SIGKILL
just before its N-th optimizer step (mid-epoch, mid-step: nothing gets to save or clean up)."""

import os
import signal
import sys

from torch.optim.optimizer import register_optimizer_step_pre_hook


def main(kill_at: int, host: str, args: list[str]) -> None:
    steps = 0

    def count(optimizer, *_):
        nonlocal steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    register_optimizer_step_pre_hook(count)
    if host == "mace":
        from equirelax.plugins.mace import main as mace_main

        mace_main(args)
    elif host == "sevenn":
        from equirelax.plugins.sevenn.training import main as sevenn_main

        sevenn_main(args)
    else:
        from nequip.scripts.train import main as nequip_main

        sys.argv = ["nequip-train", *args]
        nequip_main()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
