"""An aarch64 user space for tests: Debian's arm64 Python 3.11 + the aarch64 TVM runtime wheels, run
under qemu-user.  Built once into ``$LOWBIT_AARCH64_ENV`` (default ``~/.cache/lowbit-aarch64``).

Needs (``.ci/run`` installs them): ``qemu-aarch64`` and ``aarch64-linux-gnu-gcc`` on PATH (Debian
``qemu-user``, ``gcc-aarch64-linux-gnu``, whose sysroot ``/usr/aarch64-linux-gnu`` gives libc and
libstdc++), and arm64 in dpkg's architectures (``dpkg --add-architecture arm64; apt-get update``) so
that ``apt-get download`` fetches the interpreter's .debs; they are unpacked with ``dpkg -x``, never
installed.  The wheels come from PyPI by ``pip download --platform manylinux_2_28_aarch64``; TVM's
compiler library is deleted, so the device side is runtime-only (``TVM_USE_RUNTIME_LIB=1``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["aarch64_env", "qemu_run", "missing"]

DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libexpat1", "zlib1g", "libffi8"]
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "typing_extensions"]
SYSROOT = "/usr/aarch64-linux-gnu"
DEVICE_SCRIPT = Path(__file__).resolve().parents[1] / "runtime" / "tvm_device.py"


_DEBROOT = "arm64"  # Debian's arm64 packages, unpacked (dpkg -x), never installed
_READY = "ready-arm64"


def _home() -> Path:
    return Path(os.environ.get("LOWBIT_AARCH64_ENV", Path.home() / ".cache" / "lowbit-aarch64"))


def missing() -> str | None:
    """Why an aarch64 run is impossible here, or None."""
    for tool in ("qemu-aarch64", "aarch64-linux-gnu-gcc", "dpkg", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} not on PATH (apt-get install qemu-user gcc-aarch64-linux-gnu)"
    if not Path(SYSROOT, "lib").is_dir():
        return f"{SYSROOT} missing (apt-get install gcc-aarch64-linux-gnu)"
    if _home().joinpath(_READY).exists():
        return None
    archs = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
    if "arm64" not in archs:
        return "arm64 is not a dpkg architecture (dpkg --add-architecture arm64 && apt-get update)"
    return None


def aarch64_env() -> Path:
    """The prepared folder (arm64/ = unpacked .debs, site/ = unpacked wheels); built on first use."""
    home = _home()
    if home.joinpath(_READY).exists():
        return home
    debs, wheels, root, site = (home / d for d in ("debs", "wheels", _DEBROOT, "site"))
    for d in (debs, wheels, root, site):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *[f"{p}:arm64" for p in DEBS]], cwd=debs, check=True, capture_output=True)
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "-d", str(wheels), *WHEELS],
                   check=True, capture_output=True)
    for whl in wheels.glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    for lib in ("libtvm_compiler.so", "libtvm_runtime_cuda.so"):  # runtime-only on the device
        site.joinpath("tvm", "lib", lib).unlink(missing_ok=True)
    home.joinpath(_READY).write_text("ok\n")
    return home


def qemu_run(lib: Path, feeds: list[dict[str, np.ndarray]], timeout: int = 900,
             chunk: int = 0) -> list[dict[str, np.ndarray]]:
    """Run ``runtime/tvm_device.py`` on ``lib`` under qemu-aarch64; one output dict per feed.

    ``chunk`` > 0: one qemu process per ``chunk`` feeds (``timeout`` each), so that a long run of a
    large model keeps its feed and output files small."""
    if 0 < chunk < len(feeds):
        return [out for i in range(0, len(feeds), chunk) for out in qemu_run(lib, feeds[i:i + chunk], timeout)]
    home = aarch64_env()
    lib = Path(lib)
    fin, fout = lib.parent / "feeds.npz", lib.parent / "outputs.npz"
    np.savez(fin, **{f"f{i}.{k}": np.asarray(v) for i, f in enumerate(feeds) for k, v in f.items()})
    usr = home / _DEBROOT / "usr"
    libdirs = f"{usr / 'lib' / 'aarch64-linux-gnu'}:{home / _DEBROOT / 'lib' / 'aarch64-linux-gnu'}"
    cmd = ["qemu-aarch64", "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={libdirs}", "-E", f"PYTHONHOME={usr}",
           "-E", f"PYTHONPATH={home / 'site'}", "-E", "TVM_USE_RUNTIME_LIB=1",
           str(usr / "bin" / "python3.11"), str(DEVICE_SCRIPT), str(lib), str(fin), str(fout)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-aarch64 run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    with np.load(fout, allow_pickle=False) as z:
        out: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            i, _, name = key.partition(".")
            out.setdefault(int(i[1:]), {})[name] = z[key]
    return [out[i] for i in range(len(feeds))]
