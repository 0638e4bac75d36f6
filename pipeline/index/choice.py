"""Index choice, creation and training.

Default index rule (``index_key: auto``), for batch throughput (see docs/configuration.md, "Choosing the index";
the measurements behind each rule are in docs/benchmarks.md):

* ``n <= 20,000`` rows: ``Flat``, exact search over the row store: up to there it beats a tuned
  index (``scripts/exact_crossover.py``).
* float32 vectors that fit the workers' memory taken together (up to 200,000 rows when that
  memory is unknown; a join over lists beyond half of one worker is routed, each list group read
  once): ``IVF{nlist},Flat``, exact scores searched list by list
  (:mod:`pipeline.backends.lists`), no re-rank: faster than 4-bit PQ with re-rank at equal recall
  from 30k x 384 to 1M x 128, and than SQ8 searched query by query at d <= 64. ``nlist`` is the
  power of two nearest ``sqrt(n)`` (``LIST_MAJOR_LISTS_PER_ROOT``) until ``n / LIST_ROWS`` reaches
  ``TWO_LEVEL_MIN_LISTS`` (about 3M rows); from there the power of two nearest ``n / LIST_ROWS``,
  so lists stop growing and a query's scan keeps its size as ``n`` grows, behind a two-level
  coarse quantizer, ``IVF{nlist}(IVF{n1},Flat),Flat``: the centroids, trained by two-level
  k-means, in an IVF-Flat index of their own that probes as many of its lists as training finds
  its rows need, so assigning a row scores hundreds of centroids, not ``nlist``. The key names
  ``n1`` about ``sqrt(16 * nlist)`` (:func:`first_level_lists`); training weighs that and three
  halvings (:func:`first_level_choices`) and keeps the one that scores the fewest centroids.
  Below 4,096 lists a flat quantizer over ``sqrt(n)`` lists is cheaper (2M x 128: ``IVF1024``
  71 s, ``IVF2048`` with either quantizer 84-86 s).
* otherwise ``IVF{nlist},PQ{d/2}x4fs``: ``nlist`` is the power of two nearest ``2*sqrt(n)``
  (at most ``n / 39`` so every list gets enough training points); codes are 4-bit fast-scan
  PQ with two dimensions per sub-quantizer (``d/4`` bytes a vector). Odd ``d``, and ``d <= 64``,
  use ``SQ8``: 4-bit PQ there cannot reach the target even re-ranking 320 candidates.
* on the GPU backend the plan follows the smallest free GPU memory among the workers (each
  holds a clone of the index): ``IVF{nlist},Flat`` (exact scores, no re-rank) when the float32
  vectors fit ``GPU_INDEX_SHARE`` of it, ``IVF{nlist},SQfp16`` (float16 storage, no re-rank: its
  rounding moves scores by ~1e-3, which the recall check would catch) when half of that fits,
  else 8-bit ``PQ{m}`` codes (the GPU kernels take no fast-scan): the largest ``m`` the kernels
  support with ``m <= d/4`` (same ``d/4`` bytes a vector), else SQ8, re-ranked.
* default ``nprobe``: the power of two nearest ``4*sqrt(nlist)``; default re-rank factor 4
  for lossy codes (PQ/SQ), 0 for exact codes. Codes alone miss many true neighbours on
  real embeddings; exact re-ranking of 4k candidates recovers them.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, cast

import faiss

from pipeline.backends.gpu import PQ_SUB_DIMS, PQ_SUBQUANTIZERS, device_vector_bytes
from pipeline.backends.kernels import FAISS_METRICS, ivf_of
from pipeline.backends.lists import coarse_centroids, two_level
from pipeline.errors import ConfigError
from pipeline.kinds import Metric

__all__ = [
    "ROUTED_WHEN_LISTS_OVER",
    "encoding_key",
    "make_encoder",
    "default_index_key",
    "gpu_index_bytes",
    "explain_index_key",
    "make_index",
    "nlist_of",
    "nlist_for",
    "default_nprobe",
    "default_rerank",
    "has_exact_codes",
    "training_rows",
    "check_training_rows",
]

log = logging.getLogger(__name__)

# The measurements behind these rules are in docs/benchmarks.md ("Why the defaults are what they are").
FLAT_MAX_ROWS = 20_000  # exact search up to here: its crossover with IVF (scripts/exact_crossover.py)
# IVF-Flat (exact codes, searched list-major) for d > 64 where the vectors fit the memory rule below, since
# it beats 4-bit PQ + re-rank there at equal or higher recall; up to this many rows when the workers' memory
# is unknown
IVF_FLAT_MAX_ROWS = 200_000
# and while the float32 lists fit the workers' memory taken together: a join over lists beyond half of one
# worker is routed (pipeline.search.routed), each list group read once by one worker, so the lists need not
# fit any worker (4M x 128, 1.9 GiB of lists, in a 2 GiB container: 1.05x the unconstrained wall, where
# 4-bit PQ re-ranking at random from the row store ran 230 rows/s)
IVF_FLAT_LISTS_PER_MEMORY = 1.0
ROUTED_WHEN_LISTS_OVER = 0.5  # of a worker's memory: past it, IVF-Flat lists are joined routed
# CPU IVF-Flat gets sqrt(n) lists, not 2*sqrt(n): a list-major join scans each list with one product
# for all the queries probing it, so the per-query price of fine lists (coarse assignment of every
# row at fill and join, k-means on 64 rows a list) stops paying for the shorter scans
LIST_MAJOR_LISTS_PER_ROOT = 1.0
# from about 3M rows the CPU IVF-Flat lists keep about this many rows (nlist ~ n / LIST_ROWS, not sqrt(n)):
# the scan per query then stays flat as n grows (scripts/scale_benchmark.py)
LIST_ROWS = 1024
# bounded lists (and a two-level quantizer: an IVF-Flat index over the centroids, searched list by list
# with BLAS by pipeline.backends.lists.coarse_assign, trained by two-level k-means) from this many lists;
# below, sqrt(n) lists behind a flat quantizer cost less (2M x 128: 71 s against 84-86 s)
TWO_LEVEL_MIN_LISTS = 4096
# first-level lists a two-level quantizer probes until its training counts what its rows need
# (pipeline.backends.lists.first_level_probes); the plan's estimates assume it
QUANTIZER_NPROBE = 8
# a two-level quantizer's first-level lists hold at least this many centroids in the rule's size (a few
# probed put hundreds of lists within a query's reach; training counts the probes that find them)
FIRST_LEVEL_MIN_CENTROIDS = 16
# how much larger than the average first-level list the ones a row probes are: rows fall more often
# near the dense regions, whose lists hold more centroids (4M x 128 of sample-data, IVF4096: the lists
# probed held 1.3x to 2.5x the average, with 256 to 64 first-level lists; scripts/quantizer_benchmark.py)
FIRST_LEVEL_PROBE_BIAS = 2
MIN_POINTS_PER_LIST = 10  # below this k-means is noise: refuse
GOOD_POINTS_PER_LIST = 39  # faiss's own advice: warn below
GPU_INDEX_SHARE = 0.4  # of a GPU's free memory an IVF-Flat/float16 index may take (search batches need the rest)
SAMPLE_POINTS_PER_LIST = 64
MIN_SAMPLE = 16_384
SAMPLE_MAX_BYTES = 1 << 30


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def nlist_for(n: int, per_root: float) -> int:
    """Lists for ``n`` rows: the power of two nearest ``per_root * sqrt(n)``, halved until each list gets
    ``GOOD_POINTS_PER_LIST`` training rows."""
    nlist = _pow2(per_root * math.sqrt(n))
    while nlist > 1 and n / nlist < GOOD_POINTS_PER_LIST:
        nlist //= 2
    return nlist


SQ8_MAX_DIM = 64  # at or below: 8-bit scalar codes (on-disk lists); 4-bit PQ on 2-d sub-vectors is too coarse


def _code_size(n: int, d: int, budget: int | None) -> int:
    """PQ sub-quantizers (4 bits each): d/2, halved while n codes (+ 8-byte ids) exceed half the budget."""
    m = d // 2
    while budget and n * (m / 2 + 8) > budget / 2 and m % 2 == 0 and m > 8:
        m //= 2
    return m


# the PQ layouts FAISS's GPU kernels search: sub-quantizer counts, and dimensions per
# sub-quantizer without precomputed tables (the GPU backend checks indexes against these too)


def _gpu_codes(d: int) -> str:
    """8-bit PQ the GPU kernels can search, ``d/4`` bytes a vector or fewer; SQ8 when none fits."""
    fits = [m for m in PQ_SUBQUANTIZERS if m <= d // 4 and d % m == 0 and d // m in PQ_SUB_DIMS]
    return f"PQ{max(fits)}" if fits else "SQ8"


def default_index_key(
    n: int, d: int, memory_budget: int | None = None, gpu: bool = False, gpu_free: int = 0, *, workers: int = 1
) -> str:
    """The index_factory string used for ``index_key: auto`` (rule in the module docstring).

    ``memory_budget`` is one worker's memory: the fast-scan codes live in it, so they are kept to
    half of it by using fewer, coarser sub-quantizers (re-ranking against the stored vectors
    makes up the recall). ``gpu``: an index the GPU kernels can search, sized to ``gpu_free``,
    the smallest free GPU memory among the workers (0: unknown, codes as small as PQ's).
    """
    if n <= FLAT_MAX_ROWS:
        return "Flat"
    nlist = nlist_for(n, 2.0)
    if gpu:
        return f"IVF{nlist},{_gpu_storage(n, d, nlist, gpu_free)}"
    if _ivf_flat_fits(n, memory_budget, d=d, workers=workers):
        return _flat_key(n)
    codes = f"PQ{_code_size(n, d, memory_budget)}x4fs" if d % 2 == 0 and d > SQ8_MAX_DIM else "SQ8"
    return f"IVF{nlist},{codes}"


def _flat_key(n: int) -> str:
    """The CPU IVF-Flat key: ``sqrt(n)`` lists, or, once ``n / LIST_ROWS`` reaches
    ``TWO_LEVEL_MIN_LISTS``, lists of about ``LIST_ROWS`` rows behind a two-level quantizer."""
    bounded = _pow2(n / LIST_ROWS)
    if bounded >= TWO_LEVEL_MIN_LISTS:
        return f"IVF{bounded}(IVF{first_level_lists(bounded)},Flat),Flat"
    return f"IVF{nlist_for(n, LIST_MAJOR_LISTS_PER_ROOT)},Flat"


def first_level_lists(nlist: int) -> int:
    """First-level lists of a two-level quantizer over ``nlist`` centroids: the power of two nearest
    ``sqrt(FIRST_LEVEL_PROBE_BIAS * QUANTIZER_NPROBE * nlist)``, which minimises the centroids scored
    a row (``n1 + QUANTIZER_NPROBE * FIRST_LEVEL_PROBE_BIAS * nlist / n1``: the lists probed are larger
    than the average), halved until each holds ``FIRST_LEVEL_MIN_CENTROIDS``.

    An auto plan's training weighs this size and smaller ones (:func:`first_level_choices`): the
    rule assumes ``QUANTIZER_NPROBE`` probes, and the data decides how many it needs. At 4M x 128
    (4,096 lists) 4 of 128 first-level lists scored 427 centroids a row where 8 of 64 scored 1,357,
    both finding the 6 nearest lists of 20,000 rows as all 4,096 centroids do
    (``scripts/quantizer_benchmark.py``)."""
    n1 = _pow2(math.sqrt(FIRST_LEVEL_PROBE_BIAS * QUANTIZER_NPROBE * nlist))
    while n1 > 1 and nlist / n1 < FIRST_LEVEL_MIN_CENTROIDS:
        n1 //= 2
    return n1


# first-level sizes an auto plan's training weighs: the rule's, then halved (more lists than the rule's
# would hold fewer than FIRST_LEVEL_MIN_CENTROIDS each)
FIRST_LEVEL_CHOICES = 4


def first_level_choices(nlist: int) -> tuple[int, ...]:
    """The first-level sizes training weighs for an auto plan's two-level quantizer over ``nlist``
    centroids: :func:`first_level_lists`, then halved, ``FIRST_LEVEL_CHOICES`` in all (fewer where
    it reaches 1). The rule assumes ``QUANTIZER_NPROBE`` probes; where the data needs more (rows
    between clusters whose nearest lists sit in several first-level lists), fewer, larger
    first-level lists need fewer probes: at 16M x 64 (16,384 lists) training counted 9 probes of
    512 (781 centroids scored a row) against 4 of 256 (542)."""
    rule = first_level_lists(nlist)
    return tuple(sorted({max(1, rule >> i) for i in range(FIRST_LEVEL_CHOICES)}, reverse=True))


_FIRST_LEVEL = re.compile(r"^(IVF\d+)\(IVF(\d+),Flat\)")


def with_first_level(key: str, n1: int) -> str:
    """``key`` (a two-level key, ``IVF{nlist}(IVF{n},Flat),...``) with ``n1`` first-level lists."""
    if not _FIRST_LEVEL.match(key):
        raise ValueError(f"{key!r} has no two-level quantizer")
    return _FIRST_LEVEL.sub(lambda m: f"{m.group(1)}(IVF{n1},Flat)", key, count=1)


def gpu_index_bytes(n: int, d: int, nlist: int, code_size: int) -> int:
    """GPU memory of an IVF index storing ``n`` vectors of ``code_size`` bytes each (``4 * d`` for
    float32 vectors) in ``nlist`` lists of equal size: each list's codes and 64-bit ids as faiss's
    GPU allocates them (rounded up, :func:`pipeline.backends.gpu.device_vector_bytes`), and the
    centroids."""
    rows = math.ceil(n / max(1, nlist))
    per_list = device_vector_bytes(rows * code_size) + device_vector_bytes(rows * 8)
    return nlist * per_list + nlist * d * 4


def _gpu_storage(n: int, d: int, nlist: int, gpu_free: int) -> str:
    """What an IVF index on the GPU stores per vector: the vectors when they fit, else codes."""
    if gpu_index_bytes(n, d, nlist, 4 * d) <= GPU_INDEX_SHARE * gpu_free:
        return "Flat"
    if gpu_index_bytes(n, d, nlist, 2 * d) <= GPU_INDEX_SHARE * gpu_free:
        return "SQfp16"
    return _gpu_codes(d)


def _ivf_flat_fits(n: int, memory_budget: int | None, *, d: int, workers: int) -> bool:
    """IVF-Flat for data whose float32 lists fit the workers' memory taken together
    (``IVF_FLAT_LISTS_PER_MEMORY`` x ``workers`` x the smallest worker's): joined batch by batch
    while they fit half of a worker (memory-mapped, in the page cache), else routed, each list
    group read once per join by one worker. With that memory unknown, up to ``IVF_FLAT_MAX_ROWS``
    rows."""
    if n <= FLAT_MAX_ROWS:
        return False
    if not memory_budget:
        return n <= IVF_FLAT_MAX_ROWS
    return 4 * n * d <= IVF_FLAT_LISTS_PER_MEMORY * max(1, workers) * memory_budget


_FASTSCAN_IVFPQ = re.compile(r"^(IVF\d+[^,]*,PQ\d+)x4fsr?$")


def encoding_key(key: str) -> str:
    """The key trained and filled for ``key``: fast-scan IVF-PQ is encoded as plain 4-bit IVF-PQ.

    Fast-scan's blocked inverted lists cannot be merged safely (``merge_from`` crashed merging 8
    partial ``IVF2048,PQ64x4fs`` indexes), so pieces are encoded with the ``IndexIVFPQ`` twin
    (same quantizers, same codes), merged, and converted to fast-scan once at the end.
    """
    match = _FASTSCAN_IVFPQ.match(key)
    return f"{match.group(1)}x4" if match else key


def make_encoder(key: str, d: int, metric: Metric) -> faiss.Index:
    """The empty index trained and filled for ``key`` (see :func:`encoding_key`).

    The twin takes the real index's residual setting: ``PQmx4fs`` encodes raw vectors,
    ``PQmx4fsr`` residuals, while a plain ``PQmx4`` would default to residuals and silently
    build a different (3x slower) index than the one asked for.
    """
    encoder = make_index(encoding_key(key), d, metric)
    if encoding_key(key) != key:
        real = make_index(key, d, metric)  # keep the owner alive while reading its IVF layer
        twin, source = ivf_of(encoder), ivf_of(real)
        if twin is not None and source is not None:
            ivf: Any = faiss.downcast_index(twin)  # SWIG: by_residual lives on the IVF subclass
            ivf.by_residual = cast(Any, faiss.downcast_index(source)).by_residual
    return encoder


def _or(values: tuple[int, ...]) -> str:
    """``(512, 256, 128)`` as ``512, 256 or 128``."""
    words = [f"{v:,}" for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def explain_index_key(
    n: int, d: int, memory_budget: int | None = None, gpu: bool = False, gpu_free: int = 0, *, workers: int = 1
) -> str:
    """Why :func:`default_index_key` chose what it chose, for the report."""
    key = default_index_key(n, d, memory_budget, gpu, gpu_free, workers=workers)
    if key == "Flat":
        return f"auto: {n:,} rows <= {FLAT_MAX_ROWS:,}, exact search is cheaper than training an index"
    index = make_index(key, d, "l2")
    nlist = nlist_of(index) or 1
    if gpu:
        storage = key.split(",")[1]
        free = f"{gpu_free / 2**30:.1f} GiB" if gpu_free else "unknown"
        if storage == "Flat":
            return (
                f"auto (GPU): {n:,} rows -> nlist {nlist}; the float32 vectors "
                f"({gpu_index_bytes(n, d, nlist, 4 * d) / 2**30:.2f} GiB) fit {GPU_INDEX_SHARE:.0%} of the smallest "
                f"free GPU memory ({free}): IVF-Flat on the GPU, exact scores, no re-rank"
            )
        if storage == "SQfp16":
            return (
                f"auto (GPU): {n:,} rows -> nlist {nlist}; float32 vectors would not fit "
                f"{GPU_INDEX_SHARE:.0%} of the smallest free GPU memory ({free}), float16 "
                f"({gpu_index_bytes(n, d, nlist, 2 * d) / 2**30:.2f} GiB) does: IVF with float16 storage, no re-rank"
            )
        return (
            f"auto (GPU): {n:,} rows -> nlist {nlist}; the vectors do not fit {GPU_INDEX_SHARE:.0%} of the "
            f"smallest free GPU memory ({free}) even as float16: d={d} -> {storage}, codes the GPU kernels "
            "search (no fast-scan there); exact re-ranking recovers what the codes miss"
        )
    if key.endswith(",Flat"):
        lists = (
            "power of two nearest sqrt(n): lists searched list by list take fewer, longer lists"
            if nlist == nlist_for(n, LIST_MAJOR_LISTS_PER_ROOT)
            else f"power of two nearest n / {LIST_ROWS}: lists of about {LIST_ROWS:,} rows keep a query's scan "
            "the same size as n grows"
        )
        ivf = faiss.extract_index_ivf(index)
        nested = two_level(ivf.quantizer)
        coarse = (
            f"; its {nlist:,} centroids are found through a two-level quantizer (the centroids in an IVF index "
            f"of their own of {_or(first_level_choices(nlist))} lists, whichever scores the fewest centroids a "
            "row once training has counted the lists each must probe for its rows to find their nearest "
            f"centroids; estimated {coarse_centroids(ivf):,.0f} at {nested.nlist} lists and {nested.nprobe} "
            f"probed, instead of all {nlist:,})"
            if nested is not None
            else ""
        )
        return (
            f"auto: {n:,} rows -> nlist {nlist} ({lists}){coarse}; "
            "IVF-Flat (exact scores, searched list by list with BLAS) beats 4-bit PQ with re-ranking"
            + (f" and SQ8 searched query by query at d <= {SQ8_MAX_DIM}" if d <= SQ8_MAX_DIM else "")
            + (
                _flat_memory_why(n, d, memory_budget, workers)
                if memory_budget
                else f" (up to {IVF_FLAT_MAX_ROWS:,} rows with the workers' memory unknown)"
            )
        )
    m = _code_size(n, d, memory_budget)
    shrunk = (
        f", halved from {d // 2} to fit {n:,} codes in half of {memory_budget / 2**30:.1f} GiB per worker"
        if memory_budget and m < d // 2
        else ""
    )
    if d <= SQ8_MAX_DIM:
        codes = (
            f"SQ8 ({d} bytes a vector, memory-mapped lists): at d <= {SQ8_MAX_DIM}, 4-bit PQ on 2-d "
            "sub-vectors ranks true neighbours too coarsely for the recall target"
        )
    else:
        codes = f"4-bit fast-scan PQ{m} ({m // 2} bytes a vector{shrunk})" if d % 2 == 0 else "SQ8 (odd d)"
    return (
        f"auto: {n:,} rows -> nlist {nlist} (power of two nearest 2*sqrt(n), >= {GOOD_POINTS_PER_LIST} rows a "
        f"list); d={d} -> {codes}; exact re-ranking recovers what the codes miss"
    )


def _flat_memory_why(n: int, d: int, memory_budget: int, workers: int) -> str:
    lists = 4 * n * d
    how = (
        "joined batch by batch from the page cache"
        if lists <= ROUTED_WHEN_LISTS_OVER * memory_budget
        else "more than half of a worker, so the join is routed: each list group read once, by one worker"
    )
    return (
        f"; its {lists / 2**20:,.0f} MiB of float32 lists fit the workers' memory "
        f"({max(1, workers)} x {memory_budget / 2**30:.1f} GiB): {how}"
    )


def make_index(key: str, d: int, metric: Metric) -> faiss.Index:
    """An empty index from a factory string; a bad string is a :class:`ConfigError`."""
    try:
        index = faiss.index_factory(d, key, FAISS_METRICS[metric])
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ConfigError(
            f"index_key {key!r} is not a FAISS index_factory string for dimension {d} ({detail}); "
            "examples: 'Flat', 'IVF1024,PQ32', 'IVF256,PQ64x4fs', or 'auto'"
        ) from None
    _set_quantizer_nprobe(index)
    # index_factory turns on polysemous training for PQ codes: a permutation search that only
    # polysemous filtering uses (we never do) and that makes training 10-20x slower
    for layer in (index, ivf_of(index)):
        inner = faiss.downcast_index(layer) if layer is not None else None
        if inner is not None and hasattr(inner, "do_polysemous_training"):
            inner.do_polysemous_training = False
    return index


def _set_quantizer_nprobe(index: faiss.Index) -> None:
    """A two-level quantizer probes ``QUANTIZER_NPROBE`` of its first-level lists until training
    counts what its rows need (FAISS's default is 1, too few to find a row's nearest centroid
    reliably); saved with the index."""
    ivf = ivf_of(index)
    nested = faiss.downcast_index(ivf.quantizer) if ivf is not None else None
    if isinstance(nested, faiss.IndexIVF):
        nested.nprobe = min(int(nested.nlist), QUANTIZER_NPROBE)


def nlist_of(index: faiss.Index) -> int | None:
    ivf = ivf_of(index)
    return int(ivf.nlist) if ivf is not None else None


def has_exact_codes(index: faiss.Index) -> bool:
    """True when the stored codes are the float vectors themselves (Flat, IVF-Flat)."""
    ivf = ivf_of(index)
    inner = ivf if ivf is not None else index
    return isinstance(faiss.downcast_index(inner), (faiss.IndexFlat, faiss.IndexIVFFlat)) and not isinstance(
        index, faiss.IndexPreTransform
    )


def default_nprobe(nlist: int) -> int:
    return min(nlist, _pow2(4 * math.sqrt(nlist)))


def default_rerank(index: faiss.Index) -> int:
    """0 for exact codes and float16 storage (the recall check holds either to the target), else 4."""
    return 0 if has_exact_codes(index) or _float16_codes(index) else 4


def _float16_codes(index: faiss.Index) -> bool:
    ivf = ivf_of(index)
    inner: Any = faiss.downcast_index(ivf) if ivf is not None else None
    sq = getattr(inner, "sq", None)
    return (
        sq is not None
        and int(sq.qtype) == int(faiss.ScalarQuantizer.QT_fp16)
        and not isinstance(index, faiss.IndexPreTransform)
    )


def training_rows(index: faiss.Index, n: int, d: int, requested: int | None) -> int:
    """Rows to sample for training: ``requested``, else 64 per list (at least 16k), capped."""
    if index.is_trained:
        return 0
    if requested is not None:
        return min(requested, n)
    nlist = nlist_of(index) or 1
    want = max(SAMPLE_POINTS_PER_LIST * nlist, MIN_SAMPLE)
    return int(min(n, want, max(1, SAMPLE_MAX_BYTES // (4 * d))))


def check_training_rows(index: faiss.Index, key: str, rows: int) -> None:
    """Refuse a sample too small to train ``index``; warn when it is thin."""
    if index.is_trained:
        return
    nlist = nlist_of(index)
    need = MIN_POINTS_PER_LIST * nlist if nlist else 256
    if rows < need:
        fix = (
            f"use fewer lists (e.g. IVF{_pow2(rows / GOOD_POINTS_PER_LIST)} in --index-key)"
            if nlist
            else "use a smaller index"
        )
        raise ConfigError(
            f"the training sample has {rows} rows, too few to train {key!r} (needs at least {need}); "
            f"raise --sample-size if the data has more rows, or {fix}"
        )
    if nlist and rows < GOOD_POINTS_PER_LIST * nlist:
        log.warning(
            "training %s on %d rows: fewer than %d per list; centroids will be noisy",
            key,
            rows,
            GOOD_POINTS_PER_LIST,
        )
