"""Property-based tests (hypothesis) of the small kernels every job relies on: top-k merging,
list-to-padded scatter, id keys, tie-aware recall, dedup's exact pairs and explore counts, and
the round trips of the config and of report.json, and list-major IVF-Flat search."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.config import dump_config, parse_config
from pipeline.duplicates.exactness import exact_pairs
from pipeline.duplicates.explore import rows_dropped
from pipeline.io.ids import id_keys
from pipeline.search.exact import merge_topk
from pipeline.search.join import to_padded
from pipeline.search.recall import recall_at_k, tie_aware_recall

CI = bool(os.environ.get("CI"))
small_floats = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=150, deadline=None, derandomize=CI)
@given(
    data=st.data(), queries=st.integers(1, 4), parts=st.integers(1, 4), width=st.integers(1, 6), k=st.integers(1, 10)
)
def test_merge_topk_equals_one_sort_of_everything(data, queries, parts, width, k):
    """Merging per-piece lists gives what sorting all candidates at once gives (ties by row)."""
    pieces, start = [], 0
    for _ in range(parts):
        scores = data.draw(arrays(np.float32, (queries, width), elements=small_floats))
        rows = np.tile(np.arange(start, start + width, dtype=np.int64), (queries, 1))
        pieces.append((scores, rows))
        start += width
    k = min(k, parts * width)
    got_scores, got_rows = merge_topk(pieces, k)
    all_scores = np.concatenate([p[0] for p in pieces], axis=1)
    for q in range(queries):
        expect = sorted(range(all_scores.shape[1]), key=lambda j: (-all_scores[q, j], j))[:k]
        assert got_rows[q].tolist() == expect
        assert np.array_equal(got_scores[q], all_scores[q, expect])


@settings(max_examples=150, deadline=None, derandomize=CI)
@given(counts=st.lists(st.integers(0, 5), min_size=1, max_size=8), first=st.integers(0, 3))
def test_to_padded_puts_each_list_on_its_line_and_pads_the_rest(counts, first):
    k = 5
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = np.arange(offsets[-1], dtype=np.int64) + 100
    scores = rows.astype(np.float32) / 2
    out_rows = np.full((first + len(counts), k), -1, dtype=np.int64)
    out_scores = np.full(out_rows.shape, np.nan, dtype=np.float32)
    to_padded(out_rows, out_scores, first, offsets=offsets, rows=rows, scores=scores)
    assert (out_rows[:first] == -1).all()
    for i, c in enumerate(counts):
        line = out_rows[first + i]
        assert line[:c].tolist() == rows[offsets[i] : offsets[i + 1]].tolist() and (line[c:] == -1).all()
        assert np.isnan(out_scores[first + i, c:]).all()


@settings(max_examples=150, deadline=None, derandomize=CI)
@given(values=st.lists(st.text(max_size=12), min_size=1, max_size=30), large=st.booleans())
def test_string_id_keys_are_equal_exactly_for_equal_ids(values, large):
    """Equal strings share a key (so duplicates are found); different strings colliding would only
    cost a confirmation against the real ids, and do not happen on these small sets."""
    keys = id_keys(pa.array(values, type=pa.large_string() if large else pa.string()))
    by_value: dict[str, int] = {}
    for value, key in zip(values, keys.tolist()):
        assert by_value.setdefault(value, key) == key
    assert len(set(by_value.values())) == len(by_value)


@settings(max_examples=100, deadline=None, derandomize=CI)
@given(values=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=30))
def test_integer_id_keys_are_the_values_themselves(values):
    keys = id_keys(pa.array(values, type=pa.int64()))
    assert keys.view(np.int64).tolist() == values


@settings(max_examples=150, deadline=None, derandomize=CI)
@given(data=st.data(), k=st.integers(1, 6), queries=st.integers(1, 5))
def test_tie_aware_recall_is_one_for_any_exact_answer_and_never_below_strict(data, k, queries):
    """Any k rows scoring at least the k-th true score are a right answer, however ties are ordered."""
    n = k + 4
    levels = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # few levels: many ties
    scores = np.asarray(levels, dtype=np.float64)
    truth_order = sorted(range(n), key=lambda j: (-scores[j], j))[:k]
    truth_scores = np.tile(scores[truth_order].astype(np.float32), (queries, 1))
    kth = scores[truth_order[-1]]
    tied = [j for j in range(n) if scores[j] >= kth]
    found = [data.draw(st.permutations(tied))[:k] for _ in range(queries)]  # any exact answer
    tie = tie_aware_recall([scores[f] for f in found], truth_scores, k, "ip")
    strict = recall_at_k(found, [truth_order] * queries, k)
    assert tie == 1.0 and strict <= tie


config_values = st.fixed_dictionaries(
    {},
    optional={
        "k": st.integers(1, 1000),
        "nprobe": st.integers(1, 4096) | st.just("auto"),
        "rerank": st.integers(0, 64),
        "target_recall": st.sampled_from(["off", 0.5, 0.95, 0.999, 1.0]),
        "recall_queries": st.integers(1, 5000),
        "metric": st.sampled_from(["l2", "ip", "cosine"]),
        "index_key": st.sampled_from(["auto", "Flat", "IVF64,SQ8"]),
        "exclude_self": st.booleans(),
        "partition_size": st.sampled_from(["64MiB", "1GiB", 4096]),
        "device": st.sampled_from(["auto", "cpu", "gpu"]),
        "threshold": small_floats,
        "graph_mode": st.sampled_from(["directed", "symmetric", "mutual"]),
        "memory_limit": st.sampled_from(["auto", "4GiB"]),
    },
)


@settings(max_examples=150, deadline=None, derandomize=CI)
@given(values=config_values)
def test_config_dump_and_parse_round_trip(values):
    config = parse_config({"input": ["data/"], "output": "out", **values})
    assert parse_config(yaml.safe_load(dump_config(config))) == config


def _union_find_drops(a: list[int], b: list[int]) -> int:
    """Rows a components-mode dedup drops: linked rows minus their components (plain union-find)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    merged = 0
    for u, v in zip(a, b):
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
            merged += 1
    return merged


@settings(max_examples=150, deadline=None, derandomize=CI)
@given(pairs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)).filter(lambda p: p[0] != p[1]), max_size=60))
def test_explore_rows_dropped_equals_a_union_find(pairs):
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    assert rows_dropped(a, b) == _union_find_drops(a.tolist(), b.tolist())


@settings(max_examples=100, deadline=None, derandomize=CI)
@given(
    data=st.data(),
    n=st.integers(1, 30),
    queries=st.integers(1, 6),
    dim=st.integers(1, 5),
    metric=st.sampled_from(["ip", "l2"]),
)
def test_exact_pairs_are_every_pair_that_passes_the_threshold(data, n, queries, dim, metric):
    grid = st.integers(-4, 4).map(lambda v: v / 4)  # coarse values: many scores land exactly on the threshold
    x = data.draw(arrays(np.float32, (n, dim), elements=grid))
    q = data.draw(arrays(np.float32, (queries, dim), elements=grid))
    threshold = data.draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))
    i, j, s = exact_pairs(q, x, threshold, metric)
    scores = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1) if metric == "l2" else q @ x.T
    expect = set(zip(*np.nonzero(scores <= threshold if metric == "l2" else scores >= threshold)))
    assert set(zip(i.tolist(), j.tolist())) == {(int(a), int(c)) for a, c in expect}
    assert np.allclose(s, scores[i, j], atol=1e-5)


def test_a_job_report_survives_its_json(tmp_path):
    """report.json read back (a rerun of a finished job) gives the same typed report."""
    from pipeline.results import (
        DedupExample,
        DedupResult,
        IndexSummary,
        JobReport,
        JoinResult,
        MemoryUse,
        PairRecall,
        RecallResult,
        SearchSummary,
        TunePointRecord,
        WorkerDevice,
    )

    rec = RecallResult(
        10, 0.97, 0.95, 500, 8, 4, 0.95, True, 0.4, (TunePointRecord(8, 4, 0.97, 0.95, 0.01, 0.2, 500, 2500.0),)
    )
    join = JoinResult(
        IndexSummary("/i", "IVF64,SQ8", 1000, 16, "l2", 64, "auto"),
        SearchSummary(10, 8, 4, True, "cpu"),
        (WorkerDevice("w0", "h", "cpu", "--device cpu", 2, 0),),
        1000,
        "/o/neighbors",
        rec,
        MemoryUse(1 << 20, {"tcp://w0": 2 << 20}),
    )
    dedup = DedupResult(
        0.95,
        "greedy",
        "cosine",
        "ts",
        "max",
        1000,
        12,
        5,
        11,
        6,
        994,
        {"2": 4, "3": 1},
        0,
        2,
        (DedupExample(0, 1, 2, 0.99, 0.95, 7, "b", "x", None),),
        {"groups": "/o/groups"},
        PairRecall(100, 8, 8, 1.0, 0),
    )
    report = JobReport(
        "dedup", join, {"k": 10}, {"join": 1.5}, 3.0, 333.3, dedup=dedup, kth_score_quantiles={"p50": 0.9}
    )
    text = json.dumps(report.to_json())
    again = JobReport.from_json(json.loads(text))
    assert again == report and again.to_json() == json.loads(text)


def _random_ivf(n: int, dim: int, nlist: int, codes: str, metric: str, queries: int, seed: int):  # type: ignore[no-untyped-def]
    """An ``IVF{nlist},{codes}`` index filled with ``n`` Gaussian rows, and ``queries`` others."""
    import faiss

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    index = faiss.index_factory(
        dim, f"IVF{nlist},{codes}", faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    )
    index.train(x)
    index.add(x)
    return index, q


@settings(max_examples=25, deadline=None, derandomize=CI)
@given(
    n=st.integers(50, 1500),
    dim=st.integers(2, 24),
    nlist=st.integers(1, 32),
    nprobe=st.integers(1, 40),
    k=st.integers(1, 30),
    queries=st.integers(1, 600),
    metric=st.sampled_from(["l2", "ip"]),
    seed=st.integers(0, 10_000),
)
@example(n=175, dim=7, nlist=13, nprobe=6, k=29, queries=175, metric="l2", seed=586)  # the k-th ties the (k+1)-th
def test_list_major_search_equals_index_search(n, dim, nlist, nprobe, k, queries, metric, seed):
    """The list-by-list search of an IVF-Flat index gives what index.search gives at the same
    nprobe: the same scores, and the same ids wherever scores do not tie (empty lists and k above
    the probed vectors included: -1 ids)."""
    import faiss

    from pipeline.backends.lists import list_major_search

    index, q = _random_ivf(n, dim, min(nlist, n), "Flat", metric, queries, seed)
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    want = index.search(q, k, params=params)
    beyond, _ = index.search(q, k + 1, params=params)  # the first score not returned: the k-th may tie it
    _same_up_to_ties(want, list_major_search(index, q, k, nprobe), beyond)


@settings(max_examples=30, deadline=None, derandomize=CI)
@given(
    n=st.integers(50, 1200),
    dim=st.integers(2, 20),
    nlist=st.integers(2, 24),
    nprobe=st.integers(1, 8),
    k=st.integers(1, 20),
    queries=st.integers(1, 300),
    span=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    codes=st.sampled_from(["Flat", "SQ8", "SQfp16", "PQ1x4", "PQ1x4np"]),
    metric=st.sampled_from(["l2", "ip"]),
    seed=st.integers(0, 10_000),
)
def test_a_list_group_alone_is_searched_as_in_the_whole_index(
    n, dim, nlist, nprobe, k, queries, span, codes, metric, seed
):
    """A routed join's list group as an index of its own (:func:`group_lists`: what a GPU worker
    copies), searched among each query's preassigned lists renumbered from the group's first, gives
    what the whole index gives for those lists (lists outside the group: -1): IVF-Flat as the
    host's walk finds them, lossy codes (with their coarse scores) as FAISS scores them there."""
    import faiss

    from pipeline.backends.lists import coarse_assign, group_lists, list_major_search, packed, search_assigned
    from pipeline.search.routed import coarse_distances

    nlist = min(nlist, n)
    index, q = _random_ivf(n, dim, nlist, codes, metric, queries, seed)
    ivf = faiss.downcast_index(index)
    first, last = sorted(int(round(f * nlist)) for f in span)
    last = max(last, first + 1) if first < nlist else nlist
    first = min(first, last - 1)
    assign = coarse_assign(ivf.quantizer, q, min(nprobe, nlist))
    keys = packed(np.where((assign >= first) & (assign < last), assign, -1))  # FAISS reads at most nlist columns
    group = group_lists(ivf, first, last)
    assert group.nlist == last - first and group.ntotal == sum(ivf.invlists.list_size(i) for i in range(first, last))
    local = np.where(keys >= 0, keys - first, -1)
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    coarse = coarse_distances(q, centroids, keys, metric == "ip")
    got = search_assigned(group, q, k, local, coarse)
    if codes == "Flat":
        want = list_major_search(ivf, q, k, keys.shape[1], assign=keys)
        deeper, _ = list_major_search(ivf, q, k + 1, keys.shape[1], assign=keys)
    else:
        want = search_assigned(ivf, q, k, keys, coarse)
        deeper, _ = search_assigned(ivf, q, k + 1, keys, coarse)
    _same_up_to_ties(want, got, deeper)


def _same_up_to_ties(
    want: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], deeper: np.ndarray
) -> None:
    """``got`` (scores, ids) is FAISS's ``want``: -1 where it has -1, the same scores, and the same
    ids wherever scores do not tie; ``deeper``: each row's scores one further, whose last may tie
    the last listed."""
    (want_d, want_i), (got_d, got_i) = want, got
    assert np.array_equal(want_i < 0, got_i < 0)
    np.testing.assert_allclose(np.where(got_i < 0, 0, got_d), np.where(want_i < 0, 0, want_d), rtol=1e-4, atol=1e-4)
    for row in range(len(want_i)):  # ids agree where the scores are distinct
        gaps = np.abs(np.diff(deeper[row])) > 1e-4
        distinct = (np.r_[True, gaps] & np.r_[gaps, True])[: want_i.shape[1]]
        assert np.array_equal(want_i[row][: distinct.size][distinct], got_i[row][: distinct.size][distinct])


@settings(max_examples=60, deadline=None, derandomize=CI)
@given(
    n=st.integers(1, 300),
    dim=st.integers(1, 40),
    k=st.integers(1, 40),
    queries=st.integers(1, 150),
    metric=st.sampled_from(["l2", "ip"]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_blas_knn_equals_faiss_knn_whatever_the_threads(n, dim, k, queries, metric, threads, seed):
    """Exact search by products (for the batches FAISS scores one query at a time) gives what
    ``faiss.knn`` gives: the same scores, the same ids where scores do not tie, -1 past the rows
    there are; and the same bits on any number of threads."""
    import faiss

    from pipeline.backends import lists

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    m = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    want = faiss.knn(q, x, k, metric=m)
    lists.TILE_ROWS, before = 64, lists.TILE_ROWS  # several blocks of stored rows even when small
    try:
        got = lists.blas_knn(q, x, k, m, threads)
        again = lists.blas_knn(q, x, k, m, 1)
    finally:
        lists.TILE_ROWS = before
    assert np.array_equal(got[0], again[0]) and np.array_equal(got[1], again[1])
    _same_up_to_ties(want, got, faiss.knn(q, x, min(k + 1, n), metric=m)[0])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 60),
    width=st.integers(1, 5),
    lo=st.integers(-3, 70),
    span=st.integers(-3, 70),
    dtype=st.sampled_from(["int64", "float32", "float16", "int32"]),
)
def test_rows_of_an_npz_are_read_from_their_places(tmp_path_factory, rows, width, lo, span, dtype):
    """A slice of every array of an ``.npz`` the tool wrote, read from the file by range, is the
    slice of the array (a 1-d one too; ranges past either end clipped as Python clips them)."""
    from pipeline.io.atomic import npz_rows, write_npz

    path = tmp_path_factory.mktemp("npz") / "lists.npz"
    arrays = {
        "rows": np.arange(rows * width, dtype=dtype).reshape(rows, width),
        "flat": np.arange(rows, dtype=dtype)[::-1].copy(),
    }
    write_npz(path, **arrays)
    got = npz_rows(path, lo, lo + span)
    for name, array in arrays.items():
        want = array[max(lo, 0) : max(lo + span, 0)]
        assert got[name].dtype == array.dtype and np.array_equal(got[name], want)
        assert got[name].flags.writeable  # the caller's own, as np.load gives them


@settings(max_examples=200, deadline=None)
@given(nlist=st.integers(1, 4096), needed=st.integers(1, 4096), target=st.sampled_from([0.9, 0.95, 0.99]))
def test_the_tuning_walk_lands_within_a_few_lists_of_the_smallest_passing_nprobe(nlist, needed, target):
    """Recall that rises with nprobe and first reaches the target at ``needed`` lists: the walk
    (powers of two, then bisection) picks a passing nprobe at most an eighth above ``needed``,
    never one that fails, in at most a handful more measurements than the climb's."""
    from pipeline.search import tuning

    def point(nprobe: int | None, rerank: int) -> tuning.TunePoint:
        recall = target + 0.01 if nprobe is not None and nprobe >= needed else target - 0.01
        return tuning.TunePoint(nprobe, rerank, recall, recall, 0.0, 1.0, 500)

    points = tuning._walk(point, probes=tuning.probe_steps(nlist), factors=[4], target=target)
    chosen = tuning.choose(points, target)
    probes = tuning.probe_steps(nlist)
    if needed > min(nlist, 2048):  # nothing passes (the walk stops at 2048 lists): the best recall
        # is reported, and the walk tried every step
        assert not chosen.passes(target) and len(points) == len(probes)
        return
    assert chosen.passes(target) and chosen.nprobe is not None
    assert needed <= chosen.nprobe <= needed + needed // 8 + 1
    assert len(points) <= len(probes) + tuning.REFINE_STEPS


@settings(max_examples=30, deadline=None, derandomize=CI)
@given(
    n=st.integers(60, 1200),
    dim=st.integers(2, 32),
    nlist=st.integers(1, 40),
    k=st.integers(1, 20),
    queries=st.integers(1, 200),
    dup=st.sampled_from([0.0, 0.3, 0.8]),
    metric=st.sampled_from(["l2", "ip"]),
    seed=st.integers(0, 10_000),
)
@example(n=396, dim=11, nlist=2, k=12, queries=158, dup=0.3, metric="l2", seed=2086)  # a tie within TIE_EPS, not 1e-4
def test_recall_computed_from_list_ranks_bounds_the_searched_recall(n, dim, nlist, k, queries, dup, metric, seed):
    """For IVF-Flat, the recall at each nprobe read off the true neighbours' list ranks
    (pipeline.search.probes) never exceeds what a search at that nprobe reaches (tie-aware, per
    query), equals it wherever the data has no ties, and is exact (1.0) with every list probed:
    the tuning walk may then choose nprobe from it without searching. Duplicate-heavy sets
    (``dup``: share of rows copied from others) included."""
    import faiss

    from pipeline.search.probes import hits_at, list_ranks, neighbour_lists
    from pipeline.search.recall import TIE_EPS, tie_aware_hits

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    copies = rng.random(n) < dup
    x[copies] = x[rng.integers(0, n, copies.sum())]
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    nlist = min(nlist, n)
    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", kind)
    index.train(x)
    index.add_with_ids(x, np.arange(n, dtype=np.int64) + 5)  # ids need not be positions
    k = min(k, n)
    truth_d, truth_i = faiss.knn(q, x, k, metric=kind)
    truth_rows = truth_i + 5
    ranks = list_ranks(index, q, neighbour_lists(index, truth_rows))
    n_valid = np.full(queries, k)
    wider = faiss.knn(q, x, min(k + 1, n), metric=kind)[0]
    # near-ties in (or just past) the top k, by the tie-aware rule's own tolerance (relative to the k-th score)
    ties = np.any(np.abs(np.diff(wider, axis=1)) <= TIE_EPS * np.maximum(1.0, np.abs(wider[:, -1:])), axis=1)
    checked = 0
    for nprobe in sorted({1, 2, max(1, nlist // 2), nlist}):
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        found_d, found_i = index.search(q, k, params=params)
        exact = [
            np.array(
                [
                    float(np.sum((q[i] - x[j - 5]) ** 2)) if metric == "l2" else float(q[i] @ x[j - 5])
                    for j in row
                    if j >= 0
                ]
            )
            for i, row in enumerate(found_i)
        ]
        searched = tie_aware_hits(exact, truth_d, k, metric)
        computed = hits_at(ranks, n_valid, nprobe)
        assert np.all(computed <= searched + 1e-9)
        assert np.allclose(computed[~ties], searched[~ties])
        checked += int((~ties).sum())
        if nprobe == nlist:
            assert np.all(computed == 1.0)
    assert checked or dup or queries < 5  # tie-free queries were compared exactly
