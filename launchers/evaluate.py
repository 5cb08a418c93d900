"""STS7 evaluation entry point: ``python launchers/evaluate.py --model DIR [...]`` (= ``pcc-eval``).

It only wires: everything lives in :func:`pcc_dist.evaluation.eval_main`.
"""

import sys

from pcc_dist.evaluation import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
