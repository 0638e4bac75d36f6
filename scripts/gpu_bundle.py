"""faiss-gpu for offline CUDA 13 GPU nodes, in one bundle of at most 64 MiB.

PyPI's ``faiss-gpu`` 1.15.1 is built for CUDA 12 and pulls 580 MB of cuBLAS 12. A node with a
CUDA 13 driver and PyTorch/CuPy (cuBLAS 13) needs far less:

* ``faiss/`` and ``faiss_gpu.libs/`` from the wheel,
* ``libcudart.so.12`` (3.5 MB, from ``nvidia-cuda-runtime-cu12``; a CUDA 13 driver runs it),
* a ``libcublas.so.12`` built here from ``scripts/cublas_forward.c`` that forwards the eight
  cuBLAS calls libfaiss makes to the node's ``libcublas.so.13``, and an empty ``libcublasLt.so.12``
  (libfaiss names it but calls nothing in it),
* ``libcurand.so.10``: faiss's loader opens it but libfaiss calls nothing in it; ``install`` links
  the node's own (CuPy and PyTorch need the real one in the same process) and keeps an empty one
  only where the node has none.

On a machine with network, gcc and pip::

    python scripts/gpu_bundle.py build --out /tmp/bundle           # faiss-gpu-1.15.1-cu13.tar.xz
    python scripts/gpu_bundle.py build --out /tmp/bundle --deps    # + wheels/ of dask & co.

On the node (no network)::

    python scripts/gpu_bundle.py install /tmp/bundle/faiss-gpu-1.15.1-cu13.tar.xz --target /opt/faiss-cu13
    export PYTHONPATH=/opt/faiss-cu13:$PYTHONPATH

``install`` links the node's cuBLAS 13 and cuRAND next to the forwarder and imports faiss in a
fresh process to check it. Check GPU results against the CPU path (``pytest -m gpu``) before
trusting a node.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FAISS = "faiss-gpu==1.15.1"
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"
BUNDLE = "faiss-gpu-1.15.1-cu13.tar.xz"
LIMIT = 64 << 20
# what the pipeline needs beyond what a PyTorch/CuPy image usually has (numpy, pyarrow, pyyaml,
# psutil, cloudpickle, toolz, msgpack, click, jinja2, packaging, fsspec, sortedcontainers)
DEPS = [
    "dask==2026.8.0",
    "distributed==2026.8.0",  # what CI runs
    "partd",
    "locket",
    "tblib",
    "zict",
    "tornado",
    "threadpoolctl",
]
CUBLAS_FUNCTIONS = (
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetMathMode",
    "cublasGetMathMode",
    "cublasSgemmEx",
    "cublasGemmEx",
    "cublasGemmStridedBatchedEx",
)
HERE = Path(__file__).resolve().parent
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "manylinux_2_5_x86_64",
    "any",
]


def _download(specs: list[str], dest: Path, python: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "-d",
        str(dest),
        *[a for p in PLATFORMS for a in ("--platform", p)],
        *specs,
    ]
    subprocess.run(cmd, check=True)


def _wheel(dest: Path, name: str) -> Path:
    found = sorted(dest.glob(f"{name}-*.whl"))
    if not found:
        raise SystemExit(f"no {name} wheel in {dest}")
    return found[-1]


def _extract(wheel: Path, prefixes: tuple[str, ...], root: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.startswith(prefixes) and not info.is_dir():
                out = root / info.filename
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if info.filename.endswith(".so") or ".so." in info.filename:
                    out.chmod(0o755)


def _cc(args: list[str]) -> None:
    subprocess.run(["gcc", *args], check=True)


def _build_libs(root: Path, work: Path) -> None:
    """The cuBLAS 12 forwarder and the empty libraries, in the nvidia.* layout faiss's loader reads."""
    cublas = root / "nvidia" / "cublas" / "lib"
    curand = root / "nvidia" / "curand" / "lib"
    cublas.mkdir(parents=True)
    curand.mkdir(parents=True)
    vmap = work / "cublas12.map"
    vmap.write_text(
        "libcublas.so.12 {\n  global:\n" + "".join(f"    {f};\n" for f in CUBLAS_FUNCTIONS) + "  local: *;\n};\n"
    )
    _cc(
        [
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Wl,-soname,libcublas.so.12",
            f"-Wl,--version-script={vmap}",
            "-o",
            str(cublas / "libcublas.so.12"),
            str(HERE / "cublas_forward.c"),
            "-ldl",
            "-lpthread",
        ]
    )
    empty = work / "empty.c"
    empty.write_text("/* a soname only: libfaiss names this library but calls nothing in it */\n")
    _cc(["-shared", "-fPIC", "-Wl,-soname,libcublasLt.so.12", "-o", str(cublas / "libcublasLt.so.12"), str(empty)])
    _cc(["-shared", "-fPIC", "-Wl,-soname,libcurand.so.10", "-o", str(curand / "libcurand.so.10"), str(empty)])
    # a regular package whose __path__ also spans other nvidia/ folders on sys.path: the node's
    # own nvidia wheels (cu13) stay importable, and ours are found even where theirs has __init__.py
    (root / "nvidia" / "__init__.py").write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    for sub in ("cuda_runtime", "cublas", "curand"):
        (root / "nvidia" / sub).mkdir(exist_ok=True)
        (root / "nvidia" / sub / "__init__.py").write_text("")


def build(out: Path, python: str, deps: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "downloads"
    cache.mkdir(exist_ok=True)
    _download([FAISS, CUDART], cache, python)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = work / "site"
        _extract(_wheel(cache, "faiss_gpu"), ("faiss/", "faiss_gpu.libs/"), root)
        _extract(_wheel(cache, "nvidia_cuda_runtime_cu12"), ("nvidia/cuda_runtime/lib/libcudart.so.12",), root)
        _build_libs(root, work)
        bundle = out / BUNDLE
        tmp_bundle = out / f".{BUNDLE}.tmp"
        with (
            lzma.open(tmp_bundle, "wb", preset=9 | lzma.PRESET_EXTREME) as xz,
            tarfile.open(fileobj=xz, mode="w") as tar,
        ):
            for path in sorted(root.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(root)), recursive=False)
        tmp_bundle.replace(bundle)
    size = bundle.stat().st_size
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    print(f"{bundle}: {size / 2**20:.1f} MiB, sha256 {digest}")
    if size > LIMIT:
        raise SystemExit(f"{bundle} is {size / 2**20:.1f} MiB, over the 64 MiB a bundle may be")
    if deps:
        wheels = out / "wheels"
        wheels.mkdir(exist_ok=True)
        _download(DEPS, wheels, python)
        total = sum(p.stat().st_size for p in wheels.glob("*.whl"))
        print(
            f"{wheels}: {len(list(wheels.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB "
            f"(on the node: pip install --no-index --no-deps --target DIR {wheels}/*.whl)"
        )
    return bundle


def _find_node_lib(name: str) -> str | None:
    """``name`` from the node's Python packages (nvidia/cu13/lib, nvidia/*/lib), else ldconfig."""
    for entry in sys.path:
        for pattern in ("nvidia/cu13/lib", "nvidia/*/lib"):
            for hit in sorted(glob.glob(os.path.join(entry, pattern, name))):
                if "faiss" not in hit:
                    return os.path.realpath(hit)
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return None
    for line in listing.splitlines():
        if line.strip().startswith(name + " ") and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


NODE_LINKS = ("nvidia/cublas/lib/libcublas.so.13", "nvidia/curand/lib/libcurand.so.10")  # made by install


def install(bundle: Path, target: Path, check: bool = True) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for rel in NODE_LINKS:  # an earlier install's links to the node's libraries: tar's data filter refuses them
        if (target / rel).is_symlink():
            (target / rel).unlink()
    with lzma.open(bundle) as xz:
        data = io.BytesIO(xz.read())
    with tarfile.open(fileobj=data) as tar:
        tar.extractall(target, filter="data")
    lib = target / "nvidia" / "cublas" / "lib"
    cublas13 = _find_node_lib("libcublas.so.13")
    if cublas13 is None:
        raise SystemExit(
            "no libcublas.so.13 on this node (pip package nvidia-cublas, or the CUDA 13 toolkit); "
            "the forwarder needs it"
        )
    link = lib / "libcublas.so.13"
    link.unlink(missing_ok=True)
    link.symlink_to(cublas13)
    print(f"cuBLAS 13: {cublas13}")
    curand = _find_node_lib("libcurand.so.10")
    if curand is not None:
        stub = target / "nvidia" / "curand" / "lib" / "libcurand.so.10"
        stub.unlink()
        stub.symlink_to(curand)
        print(f"cuRAND: {curand}")
    else:
        print("cuRAND: none on this node; an empty libcurand.so.10 stands in (libfaiss calls nothing in it)")
    if check:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
        probe_gpu(env)
    print(f"export PYTHONPATH={target}:$PYTHONPATH")


# The first GPU use creates faiss's cuBLAS handle under FAISS_ASSERT, which abort()s the process
# when the forwarder or libcublas.so.13 lacks a symbol: get_num_gpus() never touches cuBLAS. So
# the probe runs a tiny GpuIndexFlat search and knn_gpu in a child process, compares both with
# faiss.knn, and on a crash reports the signal and the child's whole output.
PROBE = """
import numpy as np, faiss
print("faiss", faiss.__version__, "GPUs:", faiss.get_num_gpus(), flush=True)
if faiss.get_num_gpus():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 64)).astype("float32")
    q = x[:50].copy()
    want = faiss.knn(q, x, 10)[1]
    res = faiss.StandardGpuResources()
    flat = faiss.GpuIndexFlatL2(res, 64)
    flat.add(x)
    got_index = flat.search(q, 10)[1]
    got_knn = faiss.knn_gpu(res, q, x, 10)[1]
    same = [float((a == want).mean()) for a in (got_index, got_knn)]
    print("GpuIndexFlat and knn_gpu against faiss.knn (share of equal ids):", same, flush=True)
    if min(same) < 0.99:
        raise SystemExit("the GPU's exact search disagrees with the CPU's")
"""


def probe_gpu(env: dict[str, str]) -> None:
    """Import faiss and, with a GPU, search on it through cuBLAS, in a child process (see PROBE)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    if proc.returncode < 0:
        raise SystemExit(
            f"the GPU probe died of signal {-proc.returncode} (faiss aborts when cuBLAS is unusable: "
            "check the forwarder and libcublas.so.13); its output is above"
        )
    if proc.returncode:
        raise SystemExit(f"the GPU probe failed (exit {proc.returncode}); its output is above")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download faiss-gpu, build the forwarder, write the bundle (needs network, gcc)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--python-version", default="3.12", help="the node's Python (faiss's wheel is abi3 from 3.10)")
    b.add_argument("--deps", action="store_true", help="also download wheels of the pipeline's deps a GPU image lacks")
    i = sub.add_parser("install", help="unpack a bundle on the node and link its cuBLAS 13")
    i.add_argument("bundle", type=Path)
    i.add_argument("--target", type=Path, required=True)
    i.add_argument("--no-check", action="store_true", help="skip importing faiss afterwards")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.python_version, args.deps)
    else:
        install(args.bundle, args.target, check=not args.no_check)


if __name__ == "__main__":
    main()
