"""Lists that stop growing: past 1M rows the CPU IVF-Flat plan keeps lists of about LIST_ROWS rows,
and finds a row's lists through a two-level quantizer (the centroids in an IVF-Flat index of their
own), trained by two-level k-means and searched list by list. Its assignments must be what FAISS's
own search of that quantizer gives, the recall computed from list ranks must hold for it, and the
whole job (batched and routed join) must work on such an index."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from pipeline import run
from pipeline.backends.cpu import CpuBackend
from pipeline.backends.lists import coarse_assign, list_major_search, row_list_map, scored_centroids, two_level
from pipeline.index.choice import first_level_choices, first_level_lists, make_index
from pipeline.index.train import (
    cheapest,
    fill_first_level,
    train_two_level,
    two_level_centroids,
    weigh_first_levels,
)
from pipeline.io.sample_data import clustered_vectors
from pipeline.search.probes import hits_at, list_ranks, neighbour_lists
from pipeline.search.recall import tie_aware_hits
from tests.test_pairs import _same_up_to_ties, _tables


def _two_level_index(x: np.ndarray, nlist: int, n1: int, metric: int, seed: int = 0) -> faiss.IndexIVFFlat:
    key = f"IVF{nlist}(IVF{n1},Flat),Flat"
    owner = make_index(key, x.shape[1], "l2" if metric == faiss.METRIC_L2 else "ip")
    ivf = faiss.downcast_index(owner)
    ivf.referenced_objects = [owner]  # a downcast proxy does not own the index: keep its owner alive
    train_two_level(ivf, x, seed)
    ivf.train(x)  # the coarse quantizer is kept: nothing left to train for Flat codes
    ivf.add(x)
    return ivf


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_two_level_assignment_is_faiss_own_and_nested(metric):
    """coarse_assign through a two-level quantizer (list by list, BLAS) gives FAISS's own
    quantizer search, ties aside, and a smaller nprobe gives a prefix of a larger one's order."""
    x = clustered_vectors(40_000, 24, seed=1)
    if metric == faiss.METRIC_INNER_PRODUCT:
        faiss.normalize_L2(x)
    ivf = _two_level_index(x, 512, 8, metric)
    nested = two_level(ivf.quantizer)
    assert nested is not None and 1 <= nested.nprobe <= nested.nlist and nested.ntotal == 512
    q = clustered_vectors(3_000, 24, seed=2)  # more than LIST_MAJOR_MIN_QUERIES: the list-major walk
    wide = coarse_assign(ivf.quantizer, q, 12)
    theirs_d, theirs = ivf.quantizer.search(q, 12)
    gap = np.abs(np.diff(theirs_d, axis=1)).min(axis=1)
    clear = gap > 1e-4  # no near-tie anywhere in the order
    assert clear.mean() > 0.9
    assert np.array_equal(wide[clear], theirs[clear])
    assert np.array_equal(coarse_assign(ivf.quantizer, q, 5)[clear], wide[clear, :5])
    assert np.array_equal(coarse_assign(ivf.quantizer, q[:10], 5), ivf.quantizer.search(q[:10], 5)[1])


@pytest.mark.parametrize("dim, nlist, n1", [(24, 512, 16), (128, 1024, 32)])
def test_the_quantizer_probes_what_finds_each_rows_nearest_lists(dim, nlist, n1):
    """Training counts the first-level lists the quantizer must probe for its rows to find their
    nearest lists: on clustered data where 8 of them miss 3 to 11% of the rows' nearest lists,
    held-out rows then find their nearest list (near-ties aside), and the fill puts each row in
    it; the row map the merge saves says where each row went."""
    x = clustered_vectors(40_000, dim, seed=1)
    ivf = _two_level_index(x, nlist, n1, faiss.METRIC_L2)
    nested = two_level(ivf.quantizer)
    assert nested is not None and 8 < nested.nprobe <= n1
    q = clustered_vectors(5_000, dim, seed=4)
    nested.make_direct_map()
    distances, exact = faiss.knn(q, nested.reconstruct_n(0, nested.ntotal), 2)
    clear = distances[:, 1] - distances[:, 0] > 1e-4
    assigned = coarse_assign(ivf.quantizer, q, 1)[:, 0]
    assert (assigned[clear] == exact[clear, 0]).mean() > 0.99
    index = faiss.clone_index(ivf)
    index.reset()
    backend = CpuBackend()
    backend.set_threads(2)
    backend.add(index, q, np.arange(100, 5_100, dtype=np.int64))
    where = row_list_map(faiss.downcast_index(index))
    assert len(where) == 5_100 and (where[:100] == -1).all()
    assert np.array_equal(where[100:], assigned)


def test_the_quantizer_probes_few_first_level_lists_where_few_find_them():
    """Where a row's nearest lists sit in its nearest first-level lists, few are probed."""
    x = clustered_vectors(40_000, 24, clusters=8, seed=5)
    ivf = _two_level_index(x, 256, 8, faiss.METRIC_L2)
    nested = two_level(ivf.quantizer)
    assert nested is not None and nested.nprobe < 8


def test_training_weighs_first_level_sizes_and_keeps_the_one_scoring_fewest_centroids():
    """An auto plan's training weighs first levels of several sizes over the same centroids: each
    with the probes its rows need, counted; it keeps the one that scores the fewest centroids a
    row, which on held-out rows scores about the fewest too and finds their nearest lists. On 8
    clusters that is not the rule's size (the set where 8 probed were too many)."""
    x, q = np.split(clustered_vectors(45_000, 24, clusters=8, seed=5), [40_000])  # q: held out
    owner = make_index("IVF512(IVF16,Flat),Flat", 24, "l2")
    ivf = faiss.downcast_index(owner)
    centroids = two_level_centroids(ivf, x, 0)
    choices = first_level_choices(512)
    assert choices[0] == first_level_lists(512) and len(choices) == 4 and 512 // choices[0] >= 16
    weighed = weigh_first_levels(centroids, x, 0, faiss.METRIC_L2, choices)
    assert [w.lists for w in weighed] == list(choices)
    assert weighed == weigh_first_levels(centroids, x, 0, faiss.METRIC_L2, choices)  # counted: the same again
    kept = cheapest(weighed)
    assert kept.scored == min(w.scored for w in weighed) and kept.lists != choices[0]
    distances, exact = faiss.knn(q, centroids, 2)
    clear = distances[:, 1] - distances[:, 0] > 1e-4  # no near-tie for the nearest centroid
    held_out = {}
    for w in weighed:
        first = faiss.IndexIVFFlat(faiss.IndexFlat(24), 24, w.lists)
        fill_first_level(first, centroids, x, 0)
        assert first.nprobe == w.probes
        _, found = list_major_search(first, q, 1, int(first.nprobe))
        held_out[w.lists] = (scored_centroids(first, q), (found[clear, 0] == exact[clear, 0]).mean())
        assert held_out[w.lists][0] < 512  # every first level scores fewer centroids than all of them
    assert held_out[kept.lists][0] <= 1.2 * min(cost for cost, _ in held_out.values())
    assert held_out[kept.lists][1] > 0.99


def test_scored_centroids_counts_the_first_level_and_the_lists_probed():
    x = clustered_vectors(8_000, 16, seed=2)
    centroids = x[:256].copy()
    first = faiss.IndexIVFFlat(faiss.IndexFlat(16), 16, 8)
    fill_first_level(first, centroids, x, 0)
    first.nprobe = 8
    assert scored_centroids(first, x[:100]) == 8 + 256  # all probed: every centroid scored
    first.nprobe = 1
    sizes = np.array([first.invlists.list_size(i) for i in range(8)])
    nearest = first.quantizer.search(x[:100], 1)[1][:, 0]
    assert scored_centroids(first, x[:100]) == pytest.approx(8 + sizes[nearest].mean())


def test_an_auto_two_level_plan_keeps_the_first_level_training_chose(make_config, tmp_path, monkeypatch):
    """The auto plan's key says the first level training kept, in the report, the index file and
    the manifest; a rerun resumes with it; a key the user gives is trained as given."""
    from pipeline.index import choice
    from pipeline.io.sample_data import write_shards

    monkeypatch.setattr(choice, "LIST_ROWS", 64)  # 40,000 rows -> 512 lists of ~78 rows, behind two levels
    monkeypatch.setattr(choice, "TWO_LEVEL_MIN_LISTS", 512)
    data = tmp_path / "data"
    write_shards(data, clustered_vectors(40_000, 24, clusters=8, seed=5), shards=2, row_group_rows=5000)
    common = dict(input=str(data), k=10, exclude_self=True, metric="l2", recall_queries=300)
    report = run(make_config(output=str(tmp_path / "auto"), **common))
    key = report.index.key
    n1 = int(key.split("(IVF")[1].split(",")[0])
    assert key.startswith("IVF512(IVF") and n1 in first_level_choices(512)
    assert report.recall is not None and report.recall.met
    stored = faiss.read_index(str(tmp_path / "auto" / "index" / "index.faiss"), faiss.IO_FLAG_MMAP)
    assert faiss.downcast_index(faiss.extract_index_ivf(stored).quantizer).nlist == n1
    again = run(make_config(output=str(tmp_path / "auto"), **common))
    assert again.index.key == key
    given = run(make_config(output=str(tmp_path / "given"), index_key="IVF512(IVF32,Flat),Flat", **common))
    assert given.index.key == "IVF512(IVF32,Flat),Flat"


def test_two_level_training_is_seeded_and_fills_the_quantizer():
    x = clustered_vectors(20_000, 16, seed=3)
    a = _two_level_index(x, 256, 16, faiss.METRIC_L2, seed=7)
    b = _two_level_index(x, 256, 16, faiss.METRIC_L2, seed=7)
    assert a.is_trained and a.quantizer.ntotal == 256 and a.ntotal == 20_000
    ca = faiss.downcast_index(a.quantizer).reconstruct_n(0, 256)
    assert np.array_equal(ca, faiss.downcast_index(b.quantizer).reconstruct_n(0, 256))  # the same seed, the same lists
    sizes = np.array([a.invlists.list_size(i) for i in range(256)])
    assert sizes.min() > 0 and sizes.max() < 20 * sizes.mean()  # every list used, none swallowing the data


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_recall_computed_from_list_ranks_holds_through_a_two_level_quantizer(metric):
    """The tuning reads recall at each nprobe off the true neighbours' list ranks: through a
    two-level quantizer the ranks are its own probe order, so the computed recall is what the
    list-major search at that nprobe finds (a lower bound, equal where nothing ties)."""
    x = clustered_vectors(30_000, 16, seed=4)
    q = clustered_vectors(600, 16, seed=5)
    if metric == faiss.METRIC_INNER_PRODUCT:
        faiss.normalize_L2(x)
        faiss.normalize_L2(q)
    ivf = _two_level_index(x, 512, 8, metric)
    k = 10
    truth_d, truth_i = faiss.knn(q, x, k, metric=metric)
    ranks = list_ranks(ivf, q, neighbour_lists(ivf, truth_i))
    n_valid = np.full(len(q), k)
    similarity = metric == faiss.METRIC_INNER_PRODUCT
    for nprobe in (1, 2, 4, 8, 16):
        scores, rows = list_major_search(ivf, q, k, nprobe)
        exact = [
            (x[r[r >= 0]] @ q[i]) if similarity else ((x[r[r >= 0]] - q[i]) ** 2).sum(1) for i, r in enumerate(rows)
        ]
        searched = tie_aware_hits(exact, truth_d, k, "ip" if similarity else "l2")
        computed = hits_at(ranks, n_valid, nprobe)
        assert np.all(computed <= searched + 1e-9)
        assert computed.mean() >= searched.mean() - 0.01
    assert hits_at(ranks, n_valid, 16).mean() > 0.8 > hits_at(ranks, n_valid, 1).mean()  # not trivial


@pytest.mark.slow
def test_a_job_on_a_two_level_index_meets_its_target_batched_and_routed(make_config, tmp_path):
    """A whole self-join with a two-level key: recall met on held-out queries, and the routed join
    (lists read group by group) writes the batched join's tables."""
    from pipeline.io.sample_data import write_shards

    data = tmp_path / "data"
    write_shards(data, clustered_vectors(24_000, 24, seed=6), shards=3, row_group_rows=4000)
    common = dict(
        input=str(data), index_key="IVF256(IVF16,Flat),Flat", k=10, exclude_self=True, scheduler_address=None, workers=1
    )
    batched = run(make_config(output=str(tmp_path / "batched"), **common))
    assert batched.recall is not None and batched.recall.met and batched.index.key == "IVF256(IVF16,Flat),Flat"
    routed = run(make_config(output=str(tmp_path / "routed"), routed_join=True, **common))
    assert routed.recall is not None and routed.recall.nprobe == batched.recall.nprobe
    _same_up_to_ties(_tables(tmp_path / "routed"), _tables(tmp_path / "batched"))
