"""How stages run: the task seam (:mod:`.runner`: every Dask task a frozen, keyword-only task
record; :class:`~.runner.Stage` and :func:`~.runner.run_stage` for resumable per-piece phases),
the run :mod:`.manifest` that records what is done, and :mod:`.progress` lines."""
