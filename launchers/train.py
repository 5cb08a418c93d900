"""Training entry point for ``deepspeed launchers/train.py`` and ``torchrun launchers/train.py``.

It only wires: arguments and config come from :func:`pcc_dist.cli.train_main`.
"""

import sys

from pcc_dist.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
