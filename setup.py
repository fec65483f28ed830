"""Build script: pip install --no-build-isolation -e .  (reuses the installed torch), or
python -m build --no-isolation for a wheel and an sdist.

Compiles the CPU kernels in csrc/ (every .cpp below it) into shvit_kernels._C with torch's
cpp_extension (ninja), for the baseline instruction set of the target (x86-64 or aarch64; no
-march=native), so a wheel runs on every CPU of its architecture. The AVX2 and AVX-512 kernels
carry function target attributes and run only where the CPU has them (csrc/cpu_isa.h chooses
the level at run time). The torch version the extension was built against is written next to
it (shvit_kernels/_build_info.py) and checked at import.

Without a working C++ compiler (or with SHVIT_KERNELS_NO_CPP=1) the package installs without
the extension; the `cpp` backend then falls back to the eager composition with a warning.
SHVIT_KERNELS_REQUIRE_CPP=1 makes a failed build an error instead.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
ext_modules, cmdclass = [], {}
if os.environ.get("SHVIT_KERNELS_NO_CPP", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class BuildCpuKernels(BuildExtension):
        """torch's BuildExtension, recording the torch version, and optional unless
        SHVIT_KERNELS_REQUIRE_CPP=1."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # no compiler, a compile error, a missing header...
                if os.environ.get("SHVIT_KERNELS_REQUIRE_CPP", "0") == "1":
                    raise
                print(f"WARNING: shvit-kernels: the C++ CPU kernels were not built ({type(e).__name__}: {e}); "
                      "the package works without them (CPU tensors run the eager composition).", file=sys.stderr)
                return
            out_dir = os.path.dirname(self.get_ext_fullpath("shvit_kernels._C"))
            with open(os.path.join(out_dir, "_build_info.py"), "w") as f:
                f.write('"""Written by setup.py when it built shvit_kernels._C."""\n')
                f.write(f"TORCH_VERSION = {torch.__version__!r}\n")

    ext_modules.append(
        CppExtension(
            "shvit_kernels._C",
            sorted(glob.glob("csrc/**/*.cpp", recursive=True)),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"]},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildCpuKernels.with_options(use_ninja=True)

setup(
    name="shvit-kernels",
    version="0.1.0",
    description="SHViT (CVPR 2024) with fused kernels: reference models, checkpoints, benchmarks",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["shvit", "shvit.*", "shvit_kernels", "shvit_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    # A range, never a pin: an installed torch is reused (an isolated build or a pin
    # would pull a different, multi-GB CUDA build).
    install_requires=["torch>=2.4"],
    # ONNX export (torch's dynamo exporter needs onnxscript) and the runtimes of the benchmark
    extras_require={"onnx": ["onnx", "onnxscript", "onnxruntime", "openvino"]},
    license="Apache-2.0",
)
