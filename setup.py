"""Builds lora_runtime.ops._C from csrc/ (CUDA sources only where torch has CUDA and nvcc).

Install with `pip install --no-build-isolation -e .` so the build uses the torch that is
already installed instead of downloading another one. DEBUG=1 builds with -O0 -g.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None and bool(cuda_sources)
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No FMA contraction: merge_exact.cpp must round `W + s * P` as two separate operations,
    # exactly as the tensor ops of merged_weight() do, and lora_product.h's sums of products
    # are a multiply and an add each (its definition of B @ A).
    # No -std flag: BuildExtension adds the C++ standard this torch was built for (C++20 for 2.13).
    cxx += ["-ffp-contract=off"]
    if use_cuda:
        return CUDAExtension(
            "lora_runtime.ops._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O0", "-g"] if debug else ["-O3"]},
            define_macros=[("LORA_RUNTIME_WITH_CUDA", None)],
        )
    return CppExtension("lora_runtime.ops._C", sources, extra_compile_args={"cxx": cxx})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
