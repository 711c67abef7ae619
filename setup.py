"""Package build. Pure Python for now; the CMake-built kernel extensions plug in here."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'"(.+)"', Path("robustmerge_kernels/_version.py").read_text()).group(1)

setup(
    name="robustmerge_kernels",
    version=version,
    description="Fast, exact RobustMerge (NeurIPS 2025) merging of LoRA adapters",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["robustmerge_kernels", "robustmerge_kernels.*"]),
    python_requires=">=3.10",
    # torch is pinned in requirements.txt (the CPU wheel on the project's machines); here a
    # lower bound only, so installing this package never pulls a different torch build.
    install_requires=["torch>=2.1", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={"peft": ["peft>=0.13", "transformers>=4.45"]},
    entry_points={"console_scripts": ["robustmerge=robustmerge_kernels.cli:main"]},
)
