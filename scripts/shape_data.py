"""Generated inputs of shapes ``sample-data`` does not make, for checking defaults beyond its
clustered sets (the defaults must not be tuned to one generator).

    python scripts/shape_data.py KIND DIR --rows N --dim D [--dtype float16] [--seed S]

Kinds:

- ``anisotropic``: 50 Gaussian clusters, each stretched along its own random rotation with axis
  scales spread over two orders of magnitude (``exp(U(-3, 1.5))``), so that some directions carry
  most of the spread and a list's cell is long and thin.
- ``uniform``: isotropic Gaussian noise. The intrinsic dimension is the full dimension, so
  neighbours are barely nearer than the rest and an index must probe many lists.
- ``powerlaw``: 500 clusters whose sizes fall as ``1/rank^1.1`` (a few hold most rows), with
  log-normal row norms (sigma 0.5), the case where inner product and cosine disagree.

Rows go to ``ceil(N / 50,000)`` shards through :func:`pipeline.io.sample_data.write_shards`.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from pipeline.io.sample_data import write_shards


def anisotropic(n: int, d: int, seed: int, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    label = rng.integers(0, clusters, n)
    for c in range(clusters):
        rows = np.flatnonzero(label == c)
        scales = np.exp(rng.uniform(-3, 1.5, d)).astype(np.float32)
        rotation = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
        z = rng.standard_normal((rows.size, d)).astype(np.float32) * scales
        out[rows] = rng.standard_normal(d).astype(np.float32) * 3 + z @ rotation
    return out


def uniform(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def powerlaw(n: int, d: int, seed: int, clusters: int = 500) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weight = 1 / np.arange(1, clusters + 1) ** 1.1
    label = rng.choice(clusters, n, p=weight / weight.sum())
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[label] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x * rng.lognormal(0, 0.5, (n, 1)).astype(np.float32)


KINDS = {"anisotropic": anisotropic, "uniform": uniform, "powerlaw": powerlaw}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("directory")
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    x = KINDS[args.kind](args.rows, args.dim, args.seed)
    paths = write_shards(args.directory, x, shards=max(1, math.ceil(args.rows / 50_000)), dtype=args.dtype)
    print(f"{args.directory}: {args.rows:,} x {args.dim} {args.kind} ({args.dtype}) in {len(paths)} files")


if __name__ == "__main__":
    main()
