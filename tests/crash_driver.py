"""Test helper: trains the run whose config.json is in a workdir, optionally killing itself mid-save.

    python tests/crash_driver.py WORKDIR [KILL_IN_SAVE_OF_STEP]

With a step, the process SIGKILLs itself while orbax commits that step's
checkpoint: after the arrays are written into `<step>.orbax-checkpoint-tmp`,
before the folder is renamed to `<step>` (the moment a real preemption does
most damage). tests/test_train.py also kills it from outside at random steps.
"""

from __future__ import annotations

import os
import signal
import sys


def die_while_committing(step: str) -> None:
    # Orbax renames the finished temporary folder as the last act of a save (atomicity.py).
    from orbax.checkpoint._src.path import async_path

    rename = async_path.rename

    async def rename_or_die(src, dst):
        if os.path.basename(str(dst)) == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return await rename(src, dst)

    async_path.rename = rename_or_die


if __name__ == "__main__":
    from jaxsam.train import read_config, train_and_evaluate

    workdir = sys.argv[1]
    if len(sys.argv) > 2:
        die_while_committing(sys.argv[2])
    train_and_evaluate(read_config(workdir), workdir)
