"""The written model of a 10^9-row self-join: bytes moved, multiply-adds and time per phase of the
routed join, on N CPU nodes or N GPUs, from per-core rates measured on this design.

    python scripts/scale_model.py [--rows 1e9] [--dim 768] [--nprobe 32] [--list-rows 1000] [--markdown]

The measured inputs (2-core development machine, 2026-12-06, ``scripts/routed_benchmark.py``):
the routed join's score stage ran 1M x 128 queries, nprobe 4 of 1024 lists (977 rows a list), in
12.9 s on 2 cores: 2 x 128 x 4 x 977 x 10^6 = 1.0e12 multiply-adds x 2 in 12.9 s, 39 GFLOP/s, about 20
GFLOP/s a core. GPU rates are not measured here (no device was lent): the model takes a stated
fraction of an H100's dense float32 rate and PCIe bandwidth, and says so.
"""

from __future__ import annotations

import argparse

from pipeline.index.choice import FIRST_LEVEL_PROBE_BIAS, QUANTIZER_NPROBE, first_level_lists

CPU_GFLOPS_PER_CORE = 20.0  # the routed score stage's measured rate (see the docstring)
CPU_CORES_PER_NODE = 64
NODE_DISK_GBPS = 2.0  # reading list groups from local NVMe or object storage, per node
NODE_NET_GBPS = 2.5  # 25 GbE: routes and partial lists between nodes
GPU_TFLOPS = 25.0  # assumed: half of an H100's ~51 TFLOP/s dense float32 (no TF32), list-major products
GPU_PCIE_GBPS = 25.0  # assumed: a list group copied to the device once
GROUP_BYTES = 256 << 20  # a list group's vectors (pipeline/search/routed.py)
# measured: a two-level assignment over 4,096 centroids (IVF128 first level, 4 probed: 427 scored a
# query, d=128) assigned 420,000 queries a second to their 6 lists on 2 cores: 46 GFLOP/s, 23 a core
# against the score stage's 20 (scripts/quantizer_benchmark.py, 2026-12-06); taken as the score stage's
# rate. QUANTIZER_NPROBE (8) is assumed for the probes: training counts them on the data
ROUTE_EFFICIENCY = 1.0


def model(
    rows: float, dim: int, nprobe: int, list_rows: int, k: int, units: int, gpu: bool, groups_met: float = 0.0
) -> list[tuple[str, float, str]]:
    """(phase, seconds, what) for a self-join of ``rows`` x ``dim`` on ``units`` nodes or GPUs."""
    nlist = max(1, round(rows / list_rows))
    lists_bytes = rows * dim * 4
    flop_rate = (GPU_TFLOPS * 1e12) if gpu else (CPU_GFLOPS_PER_CORE * 1e9 * CPU_CORES_PER_NODE)
    # route: the two-level coarse quantizer (pipeline/index/choice.py): n1 first-level centroids
    # (first_level_lists), then QUANTIZER_NPROBE of its lists of nlist / n1, those probed larger than
    # the average by FIRST_LEVEL_PROBE_BIAS, at the measured ROUTE_EFFICIENCY of the score stage's rate
    # (its lists of tens of centroids are short products)
    n1 = first_level_lists(nlist)
    route_flops = 2 * dim * rows * (n1 + QUANTIZER_NPROBE * FIRST_LEVEL_PROBE_BIAS * nlist / n1)
    score_flops = 2 * dim * rows * nprobe * list_rows
    route_bytes = rows * nprobe * 8
    groups = max(1, lists_bytes / GROUP_BYTES)
    met = min(nprobe, groups, groups_met or nprobe)  # list groups a query meets (at worst one per list)
    partial_bytes = rows * met * k * 12  # a partial top k (score, row) per group met
    query_bytes = rows * met * dim * 4  # the score tasks gather each routed query once per group it meets
    read_rate = (GPU_PCIE_GBPS if gpu else NODE_DISK_GBPS) * 1e9
    return [
        (
            "scan",
            lists_bytes / (units * NODE_DISK_GBPS * 1e9),
            f"read and store {lists_bytes / 1e12:.1f} TB of vectors",
        ),
        (
            "route",
            route_flops / (units * flop_rate * ROUTE_EFFICIENCY),
            f"{route_flops:.1e} flops: each query to its {nprobe} lists",
        ),
        (
            "score",
            score_flops / (units * flop_rate)
            + lists_bytes / (units * read_rate)
            + query_bytes / (units * NODE_DISK_GBPS * 1e9),
            f"{score_flops:.1e} flops; {lists_bytes / 1e12:.1f} TB of lists read once; "
            f"{query_bytes / 1e12:.1f} TB of routed queries gathered",
        ),
        (
            "merge",
            (route_bytes + 2 * partial_bytes) / (units * NODE_NET_GBPS * 1e9),
            f"{(route_bytes + partial_bytes) / 1e12:.1f} TB of routes and partial lists moved",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1e9)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--list-rows", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--groups-met",
        type=float,
        default=0.0,
        help="list groups a query meets (default: nprobe, lists numbered at random; measured 2.2 at nprobe 6 "
        "with lists numbered by the two-level quantizer's first level)",
    )
    args = parser.parse_args()
    print(f"{args.rows:.0e} x {args.dim}, lists of {args.list_rows} rows, nprobe {args.nprobe}, k {args.k}\n")
    print("| hardware | scan | route | score | merge | total |")
    print("|---|---|---|---|---|---|")
    for units, gpu in ((8, False), (32, False), (128, False), (8, True), (32, True)):
        phases = model(args.rows, args.dim, args.nprobe, args.list_rows, args.k, units, gpu, args.groups_met)
        name = f"{units} x H100 (assumed rates)" if gpu else f"{units} CPU nodes x {CPU_CORES_PER_NODE} cores"
        cells = " | ".join(f"{s / 60:,.0f} min" for _, s, _ in phases)
        print(f"| {name} | {cells} | {sum(s for _, s, _ in phases) / 3600:,.1f} h |")
    print()
    for phase, _, what in model(args.rows, args.dim, args.nprobe, args.list_rows, args.k, 1, False, args.groups_met):
        print(f"- {phase}: {what}")


if __name__ == "__main__":
    main()
