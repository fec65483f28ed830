"""Build script: pip install --no-build-isolation -e .  (reuses the installed torch)."""
from setuptools import find_packages, setup

setup(
    name="shvit-kernels",
    version="0.1.0",
    description="SHViT (CVPR 2024) with fused kernels: reference models, checkpoints, benchmarks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["shvit", "shvit.*", "shvit_kernels", "shvit_kernels.*"]),
    python_requires=">=3.9",
    # A range, never a pin: an installed torch is reused (an isolated build or a pin
    # would pull a different, multi-GB CUDA build).
    install_requires=["torch>=2.4"],
    license="Apache-2.0",
)
