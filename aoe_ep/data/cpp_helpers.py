"""megatron-core's C++ dataset helpers (`helpers_cpp`: GPT sample indices, blending indices), ready to import.

megatron-core wheels ship them compiled; a source install has only `helpers.cpp`, and its `compile_helpers()` runs a
Makefile that wheels lack and writes into site-packages. So when the import fails, this compiles `helpers.cpp` once
into `data.cache_dir` (rank 0 first) with the C++ compiler (`$CXX`, else `c++`) and pybind11's headers, and loads it
under megatron's module name.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from aoe_ep.data.errors import DataError
from aoe_ep.data.sync import on_rank0_first

MODULE = "megatron.core.datasets.helpers_cpp"


def ensure_megatron_helpers(cache_dir: str) -> None:
    """Make `megatron.core.datasets.helpers` importable, compiling it into `cache_dir` if it has to."""
    on_rank0_first(lambda: _load(cache_dir, may_build=True), lambda: _load(cache_dir, may_build=False))


def compiled_path(cache_dir: str) -> Path:
    return Path(cache_dir) / "megatron_helpers" / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"


def _load(cache_dir: str, may_build: bool) -> None:
    try:
        importlib.import_module("megatron.core.datasets.helpers")
        return
    except ImportError as err:
        reason = str(err)
    out = compiled_path(cache_dir)
    if not out.is_file():
        if not may_build:
            raise DataError(
                f"{out}: megatron-core's dataset helpers were not built by rank 0 (is data.cache_dir "
                f"on a filesystem all ranks share?)"
            )
        _compile(out, reason)
    spec = importlib.util.spec_from_file_location(MODULE, out)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        raise DataError(
            f"{out}: cannot load the compiled megatron-core dataset helpers ({err}); delete the file to rebuild it"
        ) from None
    sys.modules[MODULE] = module
    importlib.import_module("megatron.core.datasets.helpers")


def _compile(out: Path, reason: str) -> None:
    import megatron.core.datasets as mcd

    source = Path(mcd.__file__).parent / "helpers.cpp"
    fix = "install a megatron-core wheel that ships helpers_cpp, or a C++ compiler and pybind11"
    if not source.is_file():
        raise DataError(
            f"{source}: missing, so megatron-core's dataset helpers cannot be built (import failed: {reason}); {fix}"
        )
    try:
        import pybind11
    except ImportError:
        raise DataError(
            f"{source}: building megatron-core's dataset helpers (import failed: {reason}) needs "
            f"pybind11: pip install pybind11"
        ) from None
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise DataError(
            f"{source}: building megatron-core's dataset helpers (import failed: {reason}) needs a C++ "
            f"compiler, and {compiler!r} is not on PATH (set $CXX); or {fix}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    command = [
        compiler,
        "-O3",
        "-Wall",
        "-shared",
        "-std=c++17",
        "-fPIC",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        str(source),
        "-o",
        str(tmp),
    ]
    print(f"aoe-ep: compiling megatron-core's dataset helpers into {out}", file=sys.stderr)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"{source}: compiling megatron-core's dataset helpers failed:\n{' '.join(command)}\n{done.stderr[-2000:]}"
        )
    os.replace(tmp, out)
