"""Build hook: compile the CUDA codec kernels and the batched-read library with CMake when nvcc is available.

Without nvcc (or with GDSCACHE_SKIP_CUDA=1) the package installs without them: the codecs run their torch/numpy
references and the kvikio backend reads file by file. ``GDSCACHE_CUDA_ARCHS`` overrides the architectures ("80;90").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBS = {"libgdscache_cuda.so": ("gdscache", "codecs"), "libgdscache_io.so": ("io_backends", "native")}
"""Each library CMake builds, and the package folder it goes to."""


def _want_kernels() -> bool:
    return os.environ.get("GDSCACHE_SKIP_CUDA") != "1" and _nvcc() is not None and shutil.which("cmake") is not None


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build_kernels(build_dir: Path) -> Path | None:
    """Configure and build with CMake; the build folder, or None when no CUDA toolchain is found."""
    if not _want_kernels():
        print("gdscache: nvcc or cmake not found (or GDSCACHE_SKIP_CUDA=1): installing without CUDA kernels")
        return None
    nvcc = _nvcc()
    archs = os.environ.get("GDSCACHE_CUDA_ARCHS", "80;90")
    build_dir.mkdir(parents=True, exist_ok=True)
    subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={nvcc}",
                           f"-DCMAKE_CUDA_ARCHITECTURES={archs}", "-DCMAKE_BUILD_TYPE=Release"])
    subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel"])
    return build_dir


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        built = build_kernels(ROOT / "build" / "cuda")
        base = ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib)
        for lib, folder in LIBS.items():
            target = base.joinpath(*folder)
            if built is None:
                Path(self.build_lib, *folder, lib).unlink(missing_ok=True)  # no stale libraries
                continue
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built / lib, target / lib)


class KernelDistribution(Distribution):
    """A wheel holding the kernel library is platform-specific."""

    def has_ext_modules(self) -> bool:
        return _want_kernels()


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=KernelDistribution)
