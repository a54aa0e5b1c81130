from setuptools import find_packages, setup

setup(
    name="vlm_tokenprune",
    version="0.1.0",
    description="Inference-time visual-token reduction for vision-language models: patch(model, policy).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vlm_tokenprune", "vlm_tokenprune.*"]),
    install_requires=[
        # torch is not pinned here so a CUDA install is not replaced; CI installs torch==2.13.0 (CPU) first
        "torch>=2.4",
        "transformers>=5.17,<6",
        "pyyaml>=6",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "eval": ["lmms-eval==0.7.3", "filelock<4", "pillow", "matplotlib"],
        # triton so CI runs the kernel tests (CPU, TRITON_INTERPRET=1); a 286 MB wheel, ~25 s to install.
        # Wheels are Linux-only: elsewhere the kernel tests skip with a reason.
        "test": ["pytest>=8", "hypothesis>=6", "accelerate>=1.0", "triton==3.9.0; platform_system == 'Linux'"],
    },
    entry_points={"console_scripts": ["vlm-tokenprune=vlm_tokenprune.cli:main"]},
)
