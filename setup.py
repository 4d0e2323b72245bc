from setuptools import find_packages, setup

setup(
    name="alignflow",
    version="0.1.0",
    description="Kernel-optimized training engine for representation-aligned flow-matching transformers "
                "(SiT + REPA / REG / CAR-Flow)",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "bench", "bench.*"]),
    # torch is not pinned here: a GPU machine keeps its own CUDA build; CPU installs pin it (README).
    install_requires=["torch>=2.6", "triton>=3.3", "numpy", "pyyaml", "pillow"],
    extras_require={
        "train": ["deepspeed>=0.16", "timm>=1.0", "diffusers>=0.30", "safetensors", "huggingface_hub>=0.23",
                  "tensorboard",
                  "matplotlib", "tqdm"],
        "data": ["nvidia-dali-cuda130"],
        "test": ["pytest>=8"],
        "bench": ["matplotlib"],
    },
)
