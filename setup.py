"""Package build: setuptools drives CMakeLists.txt to build the compiled backends.

`pip install -e .` (or a wheel build) configures CMake in build/ and writes the extension
modules next to the Python sources. Environment knobs: RMK_NATIVE=1 to compile for this
machine's CPU only (-march=native; the default build is portable and picks AVX-512, AVX2 or
its portable path at run time), RMK_CMAKE_ARGS for extra CMake arguments, RMK_BUILD_JOBS
for make -j.

The CPU module (_cpu) is mandatory. The CUDA module (_cuda) is built when a CUDA compiler is
found (nvcc on the PATH, $CUDACXX, or CMake's own search) and skipped with a message
otherwise; RMK_CUDA=0 turns it off. Where nvcc is present but the CUDA build fails, the
install fails (set RMK_CUDA=0 to install the CPU backend alone).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
version = re.search(r'"(.+)"', (ROOT / "robustmerge_kernels/_version.py").read_text()).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str, cuda: bool = False):
        # optional: a skipped CUDA build leaves no file to copy. Failures still stop the
        # install (CalledProcessError is not one of the errors setuptools forgives).
        super().__init__(name, sources=[], optional=cuda)
        self.target = target
        self.cuda = cuda


def cuda_wanted() -> bool:
    return os.environ.get("RMK_CUDA", "").strip() != "0"


def cuda_compiler_hint() -> str | None:
    """A CUDA compiler CMake will find, or None (then the CUDA module is skipped)."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        if ext.cuda and not cuda_wanted():
            print("robustmerge_kernels: RMK_CUDA=0, not building the CUDA backend (_cuda)")
            return
        if ext.cuda and cuda_compiler_hint() is None:
            print("robustmerge_kernels: no CUDA compiler (nvcc) found, not building the CUDA backend (_cuda)")
            return

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        args = [
            f"-DRMK_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DRMK_NATIVE={'ON' if os.environ.get('RMK_NATIVE', '').strip() == '1' else 'OFF'}",
            f"-DRMK_BUILD_CUDA={'ON' if cuda_wanted() and cuda_compiler_hint() else 'OFF'}",
            *shlex.split(os.environ.get("RMK_CMAKE_ARGS", "")),
        ]
        env = dict(os.environ)
        if cuda_wanted() and cuda_compiler_hint() and not env.get("CUDACXX") and not shutil.which("nvcc"):
            env["CUDACXX"] = cuda_compiler_hint()  # e.g. /usr/local/cuda/bin/nvcc, not on the PATH
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], env=env)
        if ext.cuda and "RMK_CUDA_ENABLED:INTERNAL=ON" not in (build_dir / "CMakeCache.txt").read_text():
            print("robustmerge_kernels: CMake found no usable CUDA compiler, not building the CUDA backend (_cuda)")
            return
        jobs = os.environ.get("RMK_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", ext.target, "-j", jobs])


setup(
    name="robustmerge_kernels",
    version=version,
    description="Fast, exact RobustMerge (NeurIPS 2025) merging of LoRA adapters",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    packages=find_packages(include=["robustmerge_kernels", "robustmerge_kernels.*"]),
    package_data={"robustmerge_kernels": ["py.typed"], "robustmerge_kernels.eval": ["tasks.json"]},
    ext_modules=[
        CMakeExtension("robustmerge_kernels._cpu", target="_cpu"),
        CMakeExtension("robustmerge_kernels._cuda", target="_cuda", cuda=True),
    ],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # torch is pinned in requirements.txt (the CPU wheel on the project's machines); here a
    # lower bound only, so installing this package never pulls a different torch build.
    install_requires=["torch>=2.1", "safetensors>=0.4", "tqdm>=4.60"],
    extras_require={"peft": ["peft>=0.13", "transformers>=4.45"]},
    entry_points={"console_scripts": ["robustmerge=robustmerge_kernels.cli:main"]},
)
