"""pcc_dist: Pcc-tuning of sentence embedders at scale.

Importing the package needs only torch (and PyYAML for the config); DeepSpeed, bitsandbytes,
MLflow, Triton and flash-attn are imported lazily where they are used.
"""

__version__ = "0.1.0"
