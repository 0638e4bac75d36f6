"""The recall stage of a join: tune what was not given to the recall target, choose the plan
(the tuned index, or exact search over the row store where the index cannot reach the target or
exact search is cheaper), and measure the plan on held-out queries."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.index.built import BuiltIndex
from pipeline.io.atomic import npz_take
from pipeline.io.layout import in_holes
from pipeline.io.nodes import fetched
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.results import RecallResult
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import result_of, submit
from pipeline.search.exact import pair_scores
from pipeline.search.join import SearchPlan, knn_path
from pipeline.search.recall import recall_at_k, tie_aware_hits
from pipeline.search.truth import TRUTH_SPARE_PER_K, keep_truth, kept_truth, refresh
from pipeline.search.tuning import (
    CONFIDENCE,
    RERANK_FACTORS,
    RecallSample,
    TunePoint,
    choose,
    draw_sample,
    joined,
    query_cost,
    searched_sample,
    sweep,
    walk,
)

__all__ = ["measure_recall", "check_lists"]

log = logging.getLogger(__name__)


def measure_recall(
    client: Any,
    config: Config,
    built: BuiltIndex,
    query_store: RowStore,
    *,
    plan: SearchPlan,
    manifest: Manifest,
    keep: RecallResult | None = None,
    new_pieces: tuple[int, ...] = (),
) -> RecallResult:
    """Tune what was not given (nprobe, the re-rank factor) to the recall target, switch to exact
    search where the index cannot reach it or exact search is cheaper, then measure the plan used
    on held-out queries (tie-aware and strict recall).

    The result is kept in the manifest: a resumed run reuses the plan rather than re-tuning
    (timings differ run to run, and the finished pieces were searched with the stored one).

    ``keep``: the plan the lists were joined with before the input was updated. It stays when it
    still meets the target on queries sampled from the updated input and on queries sampled from
    its new rows (``new_pieces``) alone, so the lists of untouched queries stay valid; otherwise
    the plan is tuned afresh.
    """
    done = manifest.stage_record("recall", RecallResult)
    if done is not None:
        return done
    s = config.search
    target = s.target_recall
    if keep is not None:
        kept = _keep_plan(
            client,
            config,
            built,
            query_store,
            plan=replace(plan, nprobe=keep.nprobe, rerank=keep.rerank, strategy=keep.strategy),
            keep=keep,
            new_pieces=new_pieces,
            manifest=manifest,
        )
        if kept is not None:
            manifest.finish_stage("recall", kept)
            return kept
    tune_nprobe = target is not None and s.nprobe is None and bool(built.nlist)
    tune_rerank = target is not None and s.rerank is None and plan.rerank > 0
    tuning = tune_nprobe or tune_rerank
    sample = draw_sample(
        client,
        built.store,
        query_store,
        n=2 * s.recall_queries if tuning else s.recall_queries,
        k=plan.k,
        metric=built.metric,
        exclude_self=plan.exclude_self,
        self_join=plan.self_join,
        seed=config.index.seed,
        spare=TRUTH_SPARE_PER_K * plan.k if plan.self_join else 0,
    )
    keep_truth(manifest, sample, k=plan.k, metric=built.metric, exclude_self=plan.exclude_self, live=built.store.live)
    curve: list[TunePoint] = []
    why = "exact search (Flat)" if plan.strategy == "exact" else "settings given"
    t0 = time.monotonic()
    chosen: TunePoint | None = None
    if tuning and target is not None:
        tune, held = sample.split()
        factors = RERANK_FACTORS if tune_rerank else (plan.rerank,)
        curve = walk(
            client,
            plan,
            built.store,
            sample=tune,
            nlist=built.nlist,
            factors=factors,
            target=target,
            nprobe=None if tune_nprobe else plan.nprobe,
        )
        for p in curve:
            speed = "computed from list ranks" if p.computed else f"{p.qps:.0f} queries/s"
            log.info(
                "  nprobe=%-5s rerank=%-2d recall@%d=%.3f (strict %.3f)  %s",
                p.nprobe,
                p.rerank,
                plan.k,
                p.recall,
                p.strict,
                speed,
            )
        chosen = choose(curve, target)
        plan = replace(plan, nprobe=chosen.nprobe, rerank=chosen.rerank)
        log.info(
            "target recall %.3f: chose nprobe=%s rerank=%d (recall %.3f on the tuning half, %d settings %s)",
            target,
            chosen.nprobe,
            chosen.rerank,
            chosen.recall,
            len(curve),
            "computed" if chosen.computed else "tried",
        )
        plan, why = _exact_or_index(
            plan,
            chosen,
            target,
            query_cost(None, ntotal=built.ntotal, dim=built.dim, k=plan.k, nprobe=None, rerank=0),
            s.allow_below_target,
        )
    else:
        held = sample
    measured = sweep(client, plan, built.store, held, [(plan.nprobe, plan.rerank)], computed=s.routed_join)[0]
    steps: list[TunePoint] = []
    if (
        tuning
        and target is not None
        and plan.strategy != "exact"
        and measured.recall < target
        and not s.allow_below_target
    ):
        plan, measured, steps, why = _step_up(
            client,
            plan,
            built,
            held=held,
            target=target,
            measured=measured,
            tune_nprobe=tune_nprobe,
            why=why,
            computed=s.routed_join,
        )
    tuned_s = time.monotonic() - t0
    log.info(
        "recall@%d %.3f (tie-aware; strict %.3f) measured on %d %squeries against exact search (%s)",
        plan.k,
        measured.recall,
        measured.strict,
        measured.queries,
        "held-out " if tuning else "sampled ",
        why,
    )
    result = RecallResult(
        plan.k,
        round(measured.recall, 4),
        round(measured.strict, 4),
        measured.queries,
        plan.nprobe,
        plan.rerank,
        target,
        target is None or measured.recall >= target,
        round(tuned_s, 3),
        tuple(p.record() for p in curve),
        plan.strategy,
        why,
        bound=None if chosen is None else round(chosen.bound, 4),
        confidence=None if chosen is None else CONFIDENCE,
        step_ups=tuple(p.record() for p in steps),
    )
    manifest.finish_stage("recall", result)
    return result


# an update measures recall on the kept sample while at least this share of its queries are still rows
KEPT_SHARE = 0.8
STEP_UPS = 4  # settings tried, held out, above a tuned one that fell short there, before exact search


def _step_up(
    client: Any,
    plan: SearchPlan,
    built: BuiltIndex,
    *,
    held: RecallSample,
    target: float,
    measured: TunePoint,
    tune_nprobe: bool,
    why: str,
    computed: bool = False,
) -> tuple[SearchPlan, TunePoint, list[TunePoint], str]:
    """The tuned setting reached the target on the tuning half but fell short held out (the
    curve was flat near the target, or the sample's queries were fewer independent ones than
    rows): step it up, half again as many lists (or twice the re-rank factor) at a time, measured
    on the held-out half, up to :data:`STEP_UPS` times; then exact search, which reaches it by
    construction. Nothing has been joined yet, so nothing is redone."""
    steps: list[TunePoint] = []
    nprobe, rerank = plan.nprobe, plan.rerank
    first = measured.recall
    for _ in range(STEP_UPS):
        if tune_nprobe and nprobe is not None and built.nlist and nprobe < built.nlist:
            nprobe = min(built.nlist, max(nprobe + 1, -(-3 * nprobe // 2)))
        elif rerank and rerank < 128:
            rerank = 2 * rerank
        else:
            break
        measured = sweep(client, plan, built.store, held, [(nprobe, rerank)], computed=computed)[0]
        steps.append(measured)
        log.info(
            "  held-out recall %.3f below the target %.3f: stepped up to nprobe=%s rerank=%d: %.3f",
            first,
            target,
            nprobe,
            rerank,
            measured.recall,
        )
        if measured.recall >= target:
            return (
                replace(plan, nprobe=nprobe, rerank=rerank),
                measured,
                steps,
                f"{why}; stepped up to nprobe={nprobe}, rerank={rerank} after the held-out half gave {first:.3f}",
            )
    log.warning(
        "held-out recall stayed below %.3f after %d step(s) up: joining with exact search over the row store",
        target,
        len(steps),
    )
    exact = replace(plan, strategy="exact", nprobe=None, rerank=0)
    measured = sweep(client, exact, built.store, held, [(None, 0)])[0]
    return (
        exact,
        measured,
        steps,
        (
            f"exact search: the tuned setting gave {first:.3f} held out, and {len(steps)} "
            "step(s) up did not reach the target"
        ),
    )


def _exact_or_index(
    plan: SearchPlan, chosen: TunePoint, target: float, exact_cost: float, allow_below: bool
) -> tuple[SearchPlan, str]:
    """The plan to join with, and why: the tuned index setting, or exact search over the row store
    when no index setting reaches ``target`` (unless ``allow_below``) or exact search costs no more
    work per query (:func:`pipeline.search.tuning.query_cost`: a model, so the same input and
    settings give the same plan on every run and machine)."""
    setting = f"nprobe={chosen.nprobe}, rerank={chosen.rerank}"
    exact = replace(plan, strategy="exact", nprobe=None, rerank=0)
    if not chosen.passes(target):
        if allow_below:
            return plan, f"tuned to {setting}, the best the index reached (below the target, accepted)"
        log.warning(
            "no setting of the index reached recall %.3f (best %.3f at %s): joining with exact search over "
            "the row store instead",
            target,
            chosen.recall,
            setting,
        )
        return exact, (
            f"exact search: the index reached at most {chosen.recall:.3f} on the tuning half "
            f"({setting}), below the target"
        )
    if chosen.cost and exact_cost <= chosen.cost:
        log.info(
            "exact search costs %.3g operations per query, the tuned index %.3g: joining with exact search",
            exact_cost,
            chosen.cost,
        )
        return (
            exact,
            f"exact search: no more work than the index at the target ({exact_cost:.3g} against "
            f"{chosen.cost:.3g} operations per query)",
        )
    return plan, f"tuned to {setting}"


def _keep_plan(
    client: Any,
    config: Config,
    built: BuiltIndex,
    query_store: RowStore,
    *,
    plan: SearchPlan,
    keep: RecallResult,
    new_pieces: tuple[int, ...],
    manifest: Manifest,
) -> RecallResult | None:
    """The last run's plan measured on queries sampled from the updated input, and on queries
    sampled from its new rows alone: its result when both meet the target (or there is none),
    else None (the plan is tuned again)."""
    s = config.search
    target = s.target_recall
    t0 = time.monotonic()
    setting = "exact search" if plan.strategy == "exact" else f"nprobe={plan.nprobe} rerank={plan.rerank}"
    live = set(query_store.live)
    new = tuple(p for p in new_pieces if p in live)
    only_new = RowStore(query_store.root, query_store.starts, query_store.total_rows, new) if new else None
    views = _kept_views(client, config, built, query_store, plan=plan, only_new=only_new, manifest=manifest)
    if views is None:
        views = _drawn_views(client, config, built, query_store, plan=plan, only_new=only_new, manifest=manifest)
    results = []
    for what, part in views:
        measured = sweep(client, plan, built.store, part, [(plan.nprobe, plan.rerank)], computed=s.routed_join)[0]
        log.info(
            "recall@%d %.3f (tie-aware) on %d queries sampled from %s at the last run's plan (%s)",
            plan.k,
            measured.recall,
            measured.queries,
            what,
            setting,
        )
        if target is not None and measured.recall < target:
            log.info("below the target %.3f on %s: tuning again", target, what)
            return None
        results.append(measured)
    measured = results[0]
    log.info(
        "recall@%d %.3f (tie-aware; strict %.3f) measured on %d sampled queries of the updated input: the last "
        "run's plan (%s) still meets the target, so it is kept",
        plan.k,
        measured.recall,
        measured.strict,
        measured.queries,
        setting,
    )
    return replace(
        keep,
        recall=round(measured.recall, 4),
        recall_strict=round(measured.strict, 4),
        queries=measured.queries,
        met=target is None or measured.recall >= target,
        tuning_s=round(time.monotonic() - t0, 3),
        why=f"{keep.why.split('; kept')[0]}; kept after the input update (still meets the target)",
        step_ups=(),
    )


def _drawn_views(
    client: Any,
    config: Config,
    built: BuiltIndex,
    query_store: RowStore,
    *,
    plan: SearchPlan,
    only_new: RowStore | None,
    manifest: Manifest,
) -> list[tuple[str, RecallSample]]:
    """The updated input and its new rows, sampled afresh: one exact pass over every row for both
    (the first kept for the next update, in a self-join)."""
    s = config.search
    sample = draw_sample(
        client,
        built.store,
        query_store,
        n=s.recall_queries,
        k=plan.k,
        metric=built.metric,
        exclude_self=plan.exclude_self,
        self_join=plan.self_join,
        seed=config.index.seed,
        also=(only_new, max(100, s.recall_queries // 2)) if only_new is not None else None,
        spare=TRUTH_SPARE_PER_K * plan.k if plan.self_join else 0,
    )
    first = min(s.recall_queries, query_store.rows)
    views = [("the updated input", sample.take(slice(0, first)))]
    if only_new is not None:
        views.append(("its new rows", sample.take(slice(first, None))))
    keep_truth(
        manifest, views[0][1], k=plan.k, metric=built.metric, exclude_self=plan.exclude_self, live=built.store.live
    )
    return views


def _kept_views(
    client: Any,
    config: Config,
    built: BuiltIndex,
    query_store: RowStore,
    *,
    plan: SearchPlan,
    only_new: RowStore | None,
    manifest: Manifest,
) -> list[tuple[str, RecallSample]] | None:
    """The updated input and its new rows, from the truth an earlier run kept
    (:mod:`pipeline.search.truth`): its queries still rows, their truth brought up to date over the
    rows new since then alone, with queries drawn from the new rows (in their share of the input,
    for the first view) and the kept queries that lost more than the spare searched over every
    row. None where no truth was kept, or too few of its queries are left (a fresh sample then)."""
    s = config.search
    if not plan.self_join:
        return None
    kept = kept_truth(manifest, k=plan.k, metric=built.metric, exclude_self=plan.exclude_self)
    if kept is None:
        return None
    store = built.store
    live = set(store.live)
    gone = [(p.start, p.rows) for p in built.dataset.retired if p.index in kept.live]
    came = tuple(sorted(live - kept.live))
    since = RowStore(store.root, store.starts, store.total_rows, came) if came else None
    left = int((~in_holes(kept.queries, gone)).sum())
    if left < KEPT_SHARE * min(s.recall_queries, query_store.rows):
        log.info("%d of the kept sampled queries are still rows: sampling afresh", left)
        return None
    old, short = refresh(
        client,
        kept,
        store,
        holes=gone,
        new_store=since,
        k=plan.k,
        metric=built.metric,
        exclude_self=plan.exclude_self,
    )
    fresh_rows = np.zeros(0, dtype=np.int64)
    if only_new is not None:
        rng = np.random.default_rng(config.index.seed + 7919)
        many_new = max(100, s.recall_queries // 2)
        fresh_rows = only_new.sample_rows(rng, many_new)
    assert old.rows is not None
    searched = np.concatenate([fresh_rows, old.rows[short]])
    full: RecallSample | None = None
    if searched.size:  # one exact pass over every row: the new rows' queries and the short ones
        full = searched_sample(
            client,
            store,
            query_store,
            searched,
            k=plan.k,
            depth=plan.k + TRUTH_SPARE_PER_K * plan.k,
            metric=built.metric,
            exclude_self=plan.exclude_self,
            self_join=True,
        )
    renewed = old.take(~short)
    if full is not None and short.any():
        renewed = joined([renewed, full.take(slice(len(fresh_rows), None))])
    from_new = full.take(slice(0, len(fresh_rows))) if full is not None and len(fresh_rows) else None
    if from_new is not None and came:
        # rows new since the kept truth, in their share of the input, drawn uniformly from the new
        # rows: with the kept queries (uniform over the rest) a sample of the updated input
        assert from_new.rows is not None
        spans = [(p.start, p.rows) for p in built.dataset.pieces if p.index in came]
        arrived = from_new.take(in_holes(from_new.rows, spans))
        share = sum(store.piece_rows(p) for p in came) / max(1, store.rows)
        many = min(len(arrived.truth), round(len(renewed.truth) * share / max(1e-9, 1.0 - share)))
        renewed = joined([renewed, arrived.take(slice(0, many))])
    log.info(
        "recall sample: %d kept queries brought up to date over %d new piece(s) (%d searched again over every "
        "row), %d drawn from the new rows",
        len(old.truth),
        len(came),
        int(short.sum()),
        len(fresh_rows),
    )
    keep_truth(manifest, renewed, k=plan.k, metric=built.metric, exclude_self=plan.exclude_self, live=store.live)
    views = [("the updated input", renewed)]
    if from_new is not None:
        views.append(("its new rows", from_new))
    return views


# an update's lists may fall this far below a search's recall on the same queries before it is said
LISTS_TOLERANCE = 0.002


@dataclass(frozen=True, kw_only=True)
class ListedTask:
    """The first ``k`` entries of some queries' kept lists (``knn/``, by global row) and each
    entry's exact score, computed from the stored vectors (``-1`` rows and NaN scores pad)."""

    knn_dir: str
    store: RowStore
    queries: np.ndarray
    k: int
    metric: Metric

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        store, k = self.store, self.k
        piece_of = np.searchsorted(store.starts, self.queries, side="right") - 1
        listed = np.full((len(self.queries), k), -1, dtype=np.int64)
        for p in np.unique(piece_of).tolist():  # each file opened once, its sampled rows read in place
            at = np.flatnonzero(piece_of == p)
            rows = npz_take(fetched(knn_path(self.knn_dir, p)), "rows", self.queries[at] - store.starts[p])
            listed[at, : min(k, rows.shape[1])] = rows[:, :k]
        valid = listed >= 0
        scores = np.full(listed.shape, np.nan, dtype=np.float32)
        if valid.any():
            mine = store.gather_vectors(np.repeat(self.queries, valid.sum(axis=1)))
            scores[valid] = pair_scores(mine, store.gather_vectors(listed[valid]), self.metric)
        return listed, scores


def check_lists(
    client: Any, built: BuiltIndex, plan: SearchPlan, manifest: Manifest, recall: RecallResult
) -> RecallResult:
    """The recall of the lists an input update wrote (patched, not searched), on the sampled
    queries whose exact neighbours the recall stage kept: what the output holds, in place of what a
    search at the plan reached on the same queries. Said loudly where they differ by more than
    :data:`LISTS_TOLERANCE` (a patch that missed what a search finds)."""
    assert plan.knn_dir is not None
    kept = kept_truth(manifest, k=plan.k, metric=built.metric, exclude_self=plan.exclude_self)
    if kept is None or not len(kept.queries):
        return recall
    task = ListedTask(knn_dir=plan.knn_dir, store=built.store, queries=kept.queries, k=plan.k, metric=built.metric)
    listed, scores = result_of(submit(client, task, "recall"))
    truth = kept.scores[:, : plan.k]
    hits = tie_aware_hits(list(scores), truth, plan.k, built.metric)
    tie = float(hits.mean()) if hits.size else float("nan")
    true_rows = kept.rows[:, : plan.k]
    strict = recall_at_k([a[a >= 0].tolist() for a in listed], [b[b >= 0].tolist() for b in true_rows], plan.k)
    said = (
        f"recall@{plan.k} {tie:.3f} (tie-aware; strict {strict:.3f}) of the updated lists on {hits.size} sampled "
        f"queries; a search at the plan: {recall.recall:.3f}"
    )
    if tie < recall.recall - LISTS_TOLERANCE:
        log.warning("%s: the patch missed neighbours a search finds; --overwrite joins every piece again", said)
    else:
        log.info("%s", said)
    return replace(
        recall,
        recall=round(tie, 4),
        recall_strict=round(strict, 4),
        queries=int(hits.size),
        met=recall.target is None or tie >= recall.target,
        why=f"{recall.why}; measured on the lists the update wrote",
    )
