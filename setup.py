"""Build script: pip install --no-build-isolation -e .  (reuses the installed torch).

Compiles the CPU kernels in csrc/ (every .cpp below it: gemm/, attention/, ops/, inference/,
register.cpp) into shvit_kernels._C with torch's cpp_extension (ninja).
Set SHVIT_KERNELS_NO_CPP=1 to skip the build; the package then runs without them (the
`cpp` backend falls back to the eager composition with a warning).

The extension is compiled for the building machine's instruction set (-march=native:
AVX2/FMA/AVX-512 where present), as a from-source install runs where it was built, with
generic tuning (-mtune=generic): GCC 12.2's tuning for Intel cores from Skylake on
(-mtune=skylake ... sapphirerapids, which -march=native implies on those CPUs) miscompiled a
dtype select in csrc/shsa_attention.cpp (an `add` placed between a `cmp` and the `cmovne`
reading its flags, so float64 inputs were computed in float32). Set
SHVIT_KERNELS_PORTABLE=1 to build for the baseline x86-64/aarch64 instruction set instead
(a build that is copied to other machines).
"""
import glob
import os

from setuptools import find_packages, setup



def _arch_flags() -> list[str]:
    if os.environ.get("SHVIT_KERNELS_PORTABLE", "0") == "1":
        return []
    import subprocess
    import tempfile

    # only where the compiler accepts it (some compilers/architectures do not)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        open(src, "w").write("int main() { return 0; }\n")
        cxx = os.environ.get("CXX", "c++")
        try:
            ok = subprocess.run([cxx, "-march=native", "-mtune=generic", src, "-o", os.path.join(d, "t")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    return ["-march=native", "-mtune=generic"] if ok else []


ext_modules, cmdclass = [], {}
if os.environ.get("SHVIT_KERNELS_NO_CPP", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "shvit_kernels._C",
            sorted(glob.glob("csrc/**/*.cpp", recursive=True)),
            include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"] + _arch_flags()},
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="shvit-kernels",
    version="0.1.0",
    description="SHViT (CVPR 2024) with fused kernels: reference models, checkpoints, benchmarks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["shvit", "shvit.*", "shvit_kernels", "shvit_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    # A range, never a pin: an installed torch is reused (an isolated build or a pin
    # would pull a different, multi-GB CUDA build).
    install_requires=["torch>=2.4"],
    license="Apache-2.0",
)
