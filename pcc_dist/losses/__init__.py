"""Losses of pcc_dist: exact global-batch InfoNCE (stage 1) and Pearson (stage 2, Pcc-tuning).

``InfoNCELoss`` / ``PearsonLoss`` are the modules the trainer uses (``CosineMSELoss`` /
``CoSENTLoss`` replace Pearson in stage 2 when ``loss.stage2_objective`` says so);
``infonce_reference`` / ``pearson_reference`` are the pure-torch functions (CPU production path and
test oracle). Importing this package needs only torch: the Triton kernels load lazily, on the
Triton path.
"""

from pcc_dist.cross_rank import PearsonOutput
from pcc_dist.losses.infonce import InfoNCELoss
from pcc_dist.losses.pearson import PearsonLoss
from pcc_dist.losses.reference_infonce import infonce_reference
from pcc_dist.losses.reference_pearson import pearson_reference
from pcc_dist.losses.score_objectives import CoSENTLoss, CosineMSELoss

__all__ = ["CoSENTLoss", "CosineMSELoss", "InfoNCELoss", "PearsonLoss", "PearsonOutput",
           "infonce_reference", "pearson_reference"]
