import glob
import json
import os
import shutil

from setuptools import find_packages, setup


def cuda_extension() -> dict:
    """kernels._csrc: the CUDA C++ kernels of csrc/ with their torch binding (csrc/bindings.cpp), for
    sm_80 and sm_90a. Built when ALIGNFLOW_BUILD_CUDA=1, or, when that is unset, on a machine with an
    NVIDIA GPU and nvcc; never on a CPU machine unless asked, so a CPU install stays as fast as before.
    The build imports torch: install with `pip install --no-build-isolation -e .`."""
    wanted = os.environ.get("ALIGNFLOW_BUILD_CUDA")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if wanted == "0" or (wanted is None and not (os.path.exists("/dev/nvidiactl") and has_nvcc)):
        return {}
    if "CUDA_HOME" not in os.environ and os.path.isdir(os.path.join(cuda_home, "include")):
        os.environ["CUDA_HOME"] = cuda_home  # else torch guesses it from nvcc's path (/usr/local/bin here)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # sm_90a as torch writes it ("9.0a" gives -gencode=arch=compute_90a,code=sm_90a; nvcc 13.0's
    # -arch=sm_90a shorthand rejects wgmma)
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "csrc", "extension_flags.json")) as f:
        flags = json.load(f)  # also what kernels._cuda.build_extension builds the test's extension with
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", flags["arch_list"])
    sources = ["csrc/bindings.cpp", *sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cu")))]
    extension = CUDAExtension(
        "kernels._csrc", sources, include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


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
        "test": ["pytest>=8", "scipy"],                 # scipy: the reference sqrtm of the FID tests
        "eval": ["torch-fidelity>=0.4"],                # engine.evaluate: the TF-Inception port and metrics
        "bench": ["matplotlib"],
        "wandb": ["wandb>=0.17"],
    },
    **cuda_extension(),
)
