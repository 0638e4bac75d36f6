"""k-NN graphs from the self-join, in the formats graph tools load without glue code.

From the join's row-form lists (``knn/``), edges are shuffled by source row and combined per
partition (:mod:`pipeline.shuffle.edges`): ``directed`` keeps the lists as joined, ``symmetric`` the union
of both directions (the closer score kept), ``mutual`` only pairs found from both ends. Written
under the output directory:

- ``edges/part-NNNNN.parquet``: ``src``, ``dst`` (row numbers), ``weight``; sorted by (src, dst);
- ``nodes/part-NNNNN.parquet``: ``row``, ``id``: row number to input id;
- ``graph.npz``: the same edges as a CSR matrix in scipy's ``save_npz`` layout;
- ``umap_knn.npz``: ``knn_indices``/``knn_dists`` (n, k+1), each row's own row first at distance
  0, as umap-learn's ``precomputed_knn`` expects (cosine distance 1 - similarity, or euclidean).

The CSR and umap files are streamed part by part into the zip: memory is one partition.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched, present
from pipeline.io.owned import discard
from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.results import DegreeStats, GraphResult
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import Stage, gather, run_stage, submit
from pipeline.search.join import knn_path
from pipeline.shuffle.components import component_sizes, connected_components
from pipeline.shuffle.edges import (
    FORWARD,
    REVERSE,
    EdgesMapped,
    MapEdgesTask,
    Part,
    degree_histogram,
    in_mode,
    make_parts,
    merge_histograms,
    part_starts,
    pieces_per_part,
    read_knn,
    reduce_edges,
    write_edges,
)

__all__ = ["GraphPlan", "graph_stages", "distances", "write_npz_stream"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphPlan:
    """Resolved graph settings (``kernel_width`` None until measured from the lists)."""

    mode: str
    metric: Metric
    k: int
    min_score: float | None
    weight: str  # score | gaussian
    kernel_width: float | None = None


def check_plan(plan: GraphPlan) -> None:
    if plan.weight == "gaussian" and plan.metric == "ip":
        raise ConfigError("--weight gaussian needs a distance: use --metric cosine or l2, or --weight score")


def distances(scores: np.ndarray, metric: Metric) -> np.ndarray:
    """Euclidean distance from a score: sqrt of the squared l2, or the chord 2 - 2 cos for cosine."""
    sq = scores if metric == "l2" else 2.0 - 2.0 * scores
    return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)


def _weights(score: np.ndarray, plan: GraphPlan) -> np.ndarray:
    if plan.weight == "score":
        return score
    assert plan.kernel_width is not None
    d = distances(score, plan.metric)
    return np.exp(-(d**2) / (2.0 * plan.kernel_width**2)).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class KthDistances:
    """A seeded sample of at most ``limit`` scores of the last neighbour in one piece's lists."""

    path: str
    limit: int
    seed: int

    def run(self) -> np.ndarray:
        path, limit, seed = self.path, self.limit, self.seed
        rows, scores = read_knn(path)
        last = scores[:, -1][rows[:, -1] >= 0]
        pick = np.random.default_rng(seed).permutation(last.size)[:limit]
        return last[pick]


@dataclass(frozen=True)
class Reduced:
    """One partition's graph: its edges, how many were found from both ends, and its out-degrees
    as {degree: rows}."""

    edges: int
    mutual: int
    degrees: dict[int, int]


@dataclass(frozen=True, kw_only=True)
class ReduceTask:
    """Combine partition ``piece``'s shuffled edges by the graph's mode: ``edges`` (weighted),
    ``nodes`` (row to id), and for directed graphs the undirected ``adj`` for components."""

    map_dirs: tuple[str, ...]
    piece: Part
    plan: GraphPlan
    store: RowStore
    edges: str
    adj: str | None
    nodes: str

    def run(self) -> Reduced:
        map_dirs, piece, plan, store, edges, adj, nodes = (
            self.map_dirs,
            self.piece,
            self.plan,
            self.store,
            self.edges,
            self.adj,
            self.nodes,
        )
        src, dst, score, flags = reduce_edges(map_dirs, piece.index, plan.metric, "symmetric")
        if adj is not None:  # directed graphs: components are taken on the undirected version
            write_edges(adj, src, dst, score)
        keep = in_mode(flags, plan.mode)
        src, dst, score, flags = src[keep], dst[keep], score[keep], flags[keep]
        write_edges(edges, src, dst, _weights(score, plan))
        with atomic_path(nodes) as tmp:
            rows = pa.array(np.arange(piece.start, piece.start + piece.rows, dtype=np.int64))
            ids = pa.concat_arrays([store.ids(p) for p in piece.pieces])
            pq.write_table(pa.table({"row": rows, "id": ids}), str(tmp))
        return Reduced(
            edges=int(src.size),
            mutual=int((flags == FORWARD | REVERSE).sum()),
            degrees=degree_histogram(src, piece.start, piece.rows),
        )


# streaming .npz ---------------------------------------------------------------------------------
def write_npz_stream(
    path: Path, members: Sequence[tuple[str, np.dtype, tuple[int, ...], Iterable[np.ndarray]]]
) -> None:
    """Write an ``.npz`` whose arrays arrive in chunks: ``(name, dtype, shape, chunks)`` each.

    Each member is a ``.npy`` written header first, then its chunks in C order, so the whole
    array is never in memory. ``np.load`` (and ``scipy.sparse.load_npz``) read it as usual.
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, dtype, shape, chunks in members:
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                header = {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False,
                    "shape": shape,
                }
                np.lib.format.write_array_header_2_0(fh, header)
                written = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    fh.write(chunk.tobytes())
                    written += chunk.size
                expect = int(np.prod(shape)) if shape else 1
                if written != expect:
                    raise RuntimeError(f"{path}: member {name} got {written} values, expected {expect}")


def _write_csr(path: Path, edge_paths: Sequence[str], pieces: Sequence[Part], n: int, nnz: int) -> None:
    index_type = np.int32 if max(n, nnz) < 2**31 else np.int64

    def indptr() -> Iterable[np.ndarray]:
        yield np.zeros(1, index_type)
        offset, at = 0, 0
        for p, e in zip(pieces, edge_paths):
            yield np.full(p.start - at, offset, index_type)  # the rows of a hole: no edges
            src = pq.read_table(fetched(e), columns=["src"]).column(0).to_numpy()
            counts = np.bincount(src - p.start, minlength=p.rows)
            yield offset + np.cumsum(counts)
            offset += int(counts.sum())
            at = p.start + p.rows
        yield np.full(n - at, offset, index_type)

    def column(name: str) -> Iterable[np.ndarray]:
        for e in edge_paths:
            yield pq.read_table(fetched(e), columns=[name]).column(0).to_numpy()

    write_npz_stream(
        path,
        [
            ("indices", np.dtype(index_type), (nnz,), column("dst")),
            ("indptr", np.dtype(index_type), (n + 1,), indptr()),
            ("format", np.dtype("S3"), (), [np.array(b"csr")]),
            ("shape", np.dtype(np.int64), (2,), [np.array([n, n])]),
            ("data", np.dtype(np.float32), (nnz,), column("weight")),
        ],
    )


def _write_umap(path: Path, knn_dir: Path, pieces: Sequence[Piece], *, n: int, k: int, metric: Metric) -> None:
    def parts(which: str) -> Iterable[np.ndarray]:
        at = 0
        for p in (*pieces, None):
            end = n if p is None else p.start
            if end > at:  # the rows of a hole (an updated input's retired rows): only themselves
                own = np.arange(at, end, dtype=np.int64)[:, None]
                if which == "knn_indices":
                    yield np.hstack([own, np.full((end - at, k), -1, np.int64)])
                else:
                    yield np.hstack([np.zeros((end - at, 1), np.float32), np.full((end - at, k), np.inf, np.float32)])
            if p is None:
                return
            at = p.start + p.rows
            rows, scores = read_knn(knn_path(knn_dir, p.index))
            own = np.arange(p.start, p.start + p.rows, dtype=np.int64)[:, None]
            if which == "knn_indices":
                yield np.hstack([own, rows])
            else:
                d = (1.0 - scores) if metric == "cosine" else distances(scores, metric)
                d = np.where(rows >= 0, np.maximum(d, 0.0), np.inf)
                yield np.hstack([np.zeros((p.rows, 1), np.float32), d.astype(np.float32)])

    write_npz_stream(
        path,
        [
            ("knn_indices", np.dtype(np.int64), (n, k + 1), parts("knn_indices")),
            ("knn_dists", np.dtype(np.float32), (n, k + 1), parts("knn_dists")),
        ],
    )


# the stages -------------------------------------------------------------------------------------
def graph_stages(
    client: Any,
    plan: GraphPlan,
    *,
    pieces: Sequence[Piece],
    store: RowStore,
    output: Path,
    manifest: Manifest,
    seed: int,
    budget: int,
) -> tuple[GraphResult, np.ndarray]:
    """Edges, nodes, CSR, umap arrays and the graph summary for the self-join in ``output``.

    Returns the summary and the first rows of the shuffle partitions (which hold the edges).

    The shuffle works on partitions of consecutive pieces whose edges fit ``budget`` bytes.
    """
    n = store.total_rows  # node numbers are global rows: an updated input's retired rows are nodes without edges
    parts = make_parts(pieces, pieces_per_part(pieces, plan.k, budget))
    starts = part_starts(parts)
    knn_dir = output / "knn"
    params = {"mode": plan.mode, "min_score": plan.min_score, "weight": plan.weight, "kernel_width": plan.kernel_width}
    changed = manifest.stage_info("graph_params") not in (None, params)
    if changed or manifest.stage_info("changed"):  # new settings, or lists an input update changed
        log.info("graph %s: rebuilding the graph from the join", "settings changed" if changed else "input updated")
        for s in ("graph_map", "graph_reduce", "graph_files", "changed"):
            manifest.clear_stage(s)
        for d in ("_graph", "edges", "nodes"):
            discard(output / d)
    manifest.finish_stage("graph_params", params)
    if plan.weight == "gaussian" and plan.kernel_width is None:
        kth = np.concatenate(
            gather(
                client,
                [
                    submit(
                        client,
                        KthDistances(
                            path=str(knn_path(knn_dir, p.index)), limit=max(1, 100_000 // len(pieces)), seed=seed
                        ),
                        "graph",
                    )
                    for p in pieces
                ],
            )
        )
        width = float(np.median(distances(kth, plan.metric))) if kth.size else 1.0
        plan = GraphPlan(plan.mode, plan.metric, plan.k, plan.min_score, plan.weight, max(width, 1e-6))
        log.info("gaussian kernel width %.4g: the median distance to the k-th neighbour", plan.kernel_width)

    work = output / "_graph"
    maps = [str(work / "map" / f"from-{p.index:05d}") for p in parts]
    run_stage(
        client,
        manifest,
        Stage(
            name="graph_map",
            items=parts,
            result=EdgesMapped,
            task=lambda p: MapEdgesTask(
                knn_paths=tuple(str(knn_path(knn_dir, i)) for i in p.pieces),
                first_row=p.start,
                starts=starts,
                out_dir=maps[p.index],
                metric=plan.metric,
                min_score=plan.min_score,
            ),
            files=lambda p: [Path(maps[p.index]) / "bounds.npy"],
        ),
    )
    edges = [str(output / "edges" / f"part-{p.index:05d}.parquet") for p in parts]
    adj = [str(work / "adj" / f"part-{p.index:05d}.parquet") for p in parts] if plan.mode == "directed" else edges
    nodes = [str(output / "nodes" / f"part-{p.index:05d}.parquet") for p in parts]
    stats = run_stage(
        client,
        manifest,
        Stage(
            name="graph_reduce",
            items=parts,
            result=Reduced,
            task=lambda p: ReduceTask(
                map_dirs=tuple(maps),
                piece=p,
                plan=plan,
                store=store,
                edges=edges[p.index],
                adj=adj[p.index] if plan.mode == "directed" else None,
                nodes=nodes[p.index],
            ),
            files=lambda p: [edges[p.index], nodes[p.index]] + ([adj[p.index]] if plan.mode == "directed" else []),
        ),
    )
    nnz = int(sum(s.edges for s in stats.values()))

    files = manifest.stage_info("graph_files")
    if files is None or not present(output / "graph.npz"):
        _write_csr(output / "graph.npz", edges, parts, n, nnz)
        if plan.metric != "ip":
            _write_umap(output / "umap_knn.npz", knn_dir, pieces, n=n, k=plan.k, metric=plan.metric)
        else:
            log.warning("umap_knn.npz not written: umap-learn needs distances, and --metric ip gives none")
        labels = connected_components(client, adj, starts=starts, total=n, work_dir=work / "components")
        sizes = component_sizes(client, labels, starts, work / "sizes", rows=[p.rows for p in parts])
        files = {"component_sizes": {str(s): c for s, c in sizes.items()}}
        manifest.finish_stage("graph_files", files)
    sizes = {int(s): c for s, c in files["component_sizes"].items()}
    degrees = merge_histograms([s.degrees for s in stats.values()])
    mutual = int(sum(s.mutual for s in stats.values()))
    deg_total = sum(d * c for d, c in degrees.items())
    result = GraphResult(
        mode=plan.mode,
        k=plan.k,
        min_score=plan.min_score,
        weight=plan.weight,
        kernel_width=plan.kernel_width,
        nodes=store.rows,
        edges=nnz,
        mutual_share=round(mutual / nnz, 4) if nnz else None,
        degree=DegreeStats(
            round(deg_total / max(store.rows, 1), 3),
            max(degrees) if degrees else 0,
            degrees.get(0, 0),
            {str(d): c for d, c in degrees.items()},
        ),
        components=int(sum(sizes.values())),
        largest_component=max(sizes) if sizes else 0,
        outputs={
            "edges": str(output / "edges"),
            "nodes": str(output / "nodes"),
            "csr": str(output / "graph.npz"),
            "umap": str(output / "umap_knn.npz") if plan.metric != "ip" else None,
        },
    )
    return result, starts


def graph_recall(sample: Any, store: RowStore, output: Path, k: int, starts: np.ndarray) -> float:
    """Share of each sampled row's exact ``k`` neighbours that are its out-edges in the graph."""
    rows = np.asarray(sample.rows)
    piece_of = np.searchsorted(starts, rows, side="right") - 1
    found: dict[int, list[int]] = {int(r): [] for r in rows}
    for p in np.unique(piece_of):  # edges are sorted by source: each sampled row's are one run of them
        edges = pq.read_table(fetched(output / "edges" / f"part-{int(p):05d}.parquet"), columns=["src", "dst"])
        src, dst = edges.column("src").to_numpy(), edges.column("dst").to_numpy()
        want = rows[piece_of == p]
        lo, hi = np.searchsorted(src, want, side="left"), np.searchsorted(src, want, side="right")
        for r, a, b in zip(want.tolist(), lo.tolist(), hi.tolist(), strict=True):
            found[r] = dst[a:b].tolist()
    flat = np.array([d for r in rows.tolist() for d in found[r]], dtype=np.int64)
    ids = store.gather_ids(flat).to_pylist() if flat.size else []
    hits, pos = [], 0
    for r, truth in zip(rows.tolist(), sample.truth):
        got = set(ids[pos : pos + len(found[r])])
        pos += len(found[r])
        t = list(truth)[:k]
        hits.append(len(got & set(t)) / max(1, len(t)))
    return float(np.mean(hits)) if hits else float("nan")
