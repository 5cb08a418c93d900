"""STS7 evaluation entry point: ``python launchers/evaluate.py --model DIR [...]`` (= ``pcc-eval``).

It only wires: everything lives in :func:`pcc_dist.eval_cli.eval_main`.
"""

import sys

from pcc_dist.eval_cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
