"""Cluster profiles and batch submission scripts: parsed once, checked, quoted; no shell involved."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import ConfigError, parse_config
from pipeline.cluster.submit import prepare

from .conftest import private_workers

SLURM = {
    "kind": "slurm",
    "queue": "gpu",
    "account": "ml-team",
    "cores": 8,
    "memory": "32GiB",
    "gpus": 1,
    "jobs": 4,
    "walltime": "04:00:00",
    "directives": ["--constraint=a100"],
    "setup": ["module load cuda/12"],
}


def config(tmp_path: Path, **profile):
    return parse_config(
        {"input": "data/", "output": str(tmp_path / "out"), "profile": "hpc", "profiles": {"hpc": {**SLURM, **profile}}}
    )


def test_profiles_resolve_to_kinds(tmp_path):
    c = config(tmp_path)
    assert (
        c.cluster.kind == "slurm"
        and c.cluster.jobqueue.jobs == 4
        and c.cluster.jobqueue.setup == ("module load cuda/12",)
    )
    assert parse_config({"profile": "pbs"}).cluster.jobqueue.kind == "pbs"  # built-in names need no entry
    assert parse_config({}).cluster.kind == "local"
    assert parse_config({"scheduler_address": "tcp://h:8786"}).cluster.kind == "address"


@pytest.mark.parametrize(
    "profile, message",
    [
        ({"queue": "gpu; rm -rf ~"}, "may hold only letters"),
        ({"account": "$(id)"}, "may hold only letters"),
        ({"directives": ["--qos=x\n#SBATCH --uid=0"]}, "without line breaks"),
        ({"setup": ["source env\nrm -rf /"]}, "without line breaks"),
        ({"walltime": "soon"}, "walltime such as"),
        ({"adaptive_min": 1}, "both adaptive_min and adaptive_max"),
        ({"adaptive_min": 5, "adaptive_max": 2}, "adaptive_min 5 > adaptive_max 2"),
        ({"queus": "gpu"}, "did you mean 'queue'"),
        ({"kind": "lsf"}, "expected one of local, address, slurm, pbs"),
    ],
)
def test_bad_profiles_are_refused(tmp_path, profile, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **profile)


def test_unknown_profile_and_address_without_scheduler():
    with pytest.raises(ConfigError, match="no profile 'big'"):
        parse_config({"profile": "big"})
    with pytest.raises(ConfigError, match="--scheduler-address"):
        parse_config({"profile": "address"})
    with pytest.raises(ConfigError, match="cannot be combined"):
        parse_config({"profile": "slurm", "scheduler_address": "tcp://h:8786"})


def test_driver_script_for_slurm(tmp_path):
    sub = prepare("dedup", config(tmp_path))
    lines = sub.script.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --account=ml-team" in lines
    assert "#SBATCH --time=04:00:00" in lines and "#SBATCH --constraint=a100" in lines
    assert f"#SBATCH --output={tmp_path}/out/logs/driver-%j.log" in lines
    assert lines.index("module load cuda/12") < len(lines) - 1  # set-up runs before the driver
    assert lines[-1].endswith(f"-m pipeline dedup --config {tmp_path}/out/logs/submit-dedup.yaml")
    assert sub.argv == ("sbatch", "--parsable", str(tmp_path / "out" / "logs" / "submit-dedup.sh"))
    assert "--gres=gpu:1" in sub.worker_script and "--cpus-per-task=8" in sub.worker_script


def test_driver_script_for_pbs_quotes_paths(tmp_path):
    c = config(tmp_path, kind="pbs", python="/opt/my envs/bin/python")
    sub = prepare("graph", c)
    assert "#PBS -q gpu" in sub.script and "#PBS -l walltime=04:00:00" in sub.script
    assert "exec '/opt/my envs/bin/python' -m pipeline graph" in sub.script
    assert sub.argv[0] == "qsub"


def test_submit_needs_a_batch_profile(tmp_path):
    with pytest.raises(ConfigError, match="needs a slurm or pbs profile"):
        prepare("run", parse_config({"input": "d", "output": str(tmp_path)}))
    with pytest.raises(ConfigError, match="cannot hold spaces"):
        prepare("run", parse_config({"input": "d", "output": str(tmp_path / "my out"), "profile": "slurm"}))


def test_submit_dry_run_prints_both_scripts_and_writes_nothing(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: data/\noutput: {tmp_path / 'out'}\nprofile: slurm\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", "--config", str(cfg), "--dry-run"],  # JOB: run
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "# driver job script" in proc.stdout and "distributed.cli.dask_worker" in proc.stdout
    assert "-m pipeline run --config" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_python_with_shell_syntax_is_refused():
    with pytest.raises(ConfigError, match=r"python: .* must be a plain interpreter path, without shell characters"):
        parse_config({"profile": "hpc", "profiles": {"hpc": {**SLURM, "python": "/usr/bin/python3 $(touch /tmp/x)"}}})


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_worker_script_run_under_bash_never_runs_the_interpreter_value_as_code(tmp_path, kind):
    """Even a value that escaped validation is one quoted word in dask-jobqueue's worker command."""
    from dataclasses import replace

    from pipeline.cluster.submit import _worker_script

    marker = tmp_path / "injected"
    jq = replace(config(tmp_path, kind=kind).cluster.jobqueue, python=f"/usr/bin/python3 $(touch {marker})", setup=())
    script = tmp_path / "worker.sh"
    script.write_text(_worker_script(jq, tmp_path / "logs"))
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 127 and "No such file or directory" in proc.stderr  # the whole value is the command
    assert not marker.exists()


def test_each_worker_chooses_its_device_and_says_why(dask_address):
    """The plugin runs on the workers: their answer counts, not the driver's."""
    from distributed import Client

    from pipeline.backends.gpu import gpu_runtime_problem
    from pipeline.backends.worker import install_device

    with Client(dask_address) as client:
        devices = install_device(client, "auto", 1)
        assert len(devices) == 2 and {d.backend for d in devices} == {"cpu"}
        assert all(d.reason == gpu_runtime_problem() and d.faiss_threads == 1 for d in devices)
        assert [d.backend for d in install_device(client, "cpu", None)] == ["cpu", "cpu"]


def test_a_driver_that_sees_a_gpu_still_runs_what_the_workers_have(make_config, dataset_dir, monkeypatch):
    """The driver's own environment decides nothing: here it claims a GPU, the workers have none."""
    import pipeline.backends.gpu
    import pipeline.cluster.clients
    from pipeline import run

    monkeypatch.setattr(pipeline.backends.gpu, "gpu_runtime_problem", lambda: None)
    monkeypatch.setattr(pipeline.cluster.clients, "gpu_runtime_problem", lambda: None)
    report = run(make_config(input=str(dataset_dir), k=3, index_key="Flat", device="auto"))
    assert report.search.backend == "cpu"
    assert len(report.devices) == 2 and all(d.backend == "cpu" for d in report.devices)
    assert all("CPU-only build" in d.reason or "no CUDA device" in d.reason for d in report.devices)


def test_gpus_are_asked_for_worker_jobs_only_one_process_each(tmp_path):
    c = config(tmp_path, gpus=2, processes=None)
    assert c.cluster.jobqueue.processes == 2
    sub = prepare("run", c)
    assert "--gres=gpu:2" in sub.worker_script and "--nworkers 2" in sub.worker_script
    assert "--gres" not in sub.script  # the driver asks for no GPU
    pbs = prepare("run", config(tmp_path, kind="pbs", gpus=1))
    assert "-l ngpus=1" in pbs.worker_script and "ngpus" not in pbs.script
    with pytest.raises(ConfigError, match=r"processes 4 with gpus 2: each GPU gets one worker process"):
        config(tmp_path, gpus=2, processes=4)


def test_workers_sharing_gpus_each_claim_a_free_one_whatever_their_names(monkeypatch, tmp_path):
    """Each claim takes the first GPU no live claim holds (a lock per GPU, released when its holder
    ends); past the GPUs, claims share; one visible GPU (dask-cuda) is always device 0."""
    import faiss

    from pipeline.backends import gpu

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 3, raising=False)
    held = [gpu.claim_gpu(str(tmp_path)) for _ in range(3)]
    assert [device for device, _ in held] == [0, 1, 2]
    device, lock = gpu.claim_gpu(str(tmp_path))
    assert lock is None and 0 <= device < 3  # a fourth worker shares
    held[1][1].close()  # the worker on GPU 1 ended
    device, lock = gpu.claim_gpu(str(tmp_path))
    assert device == 1 and lock is not None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # names from the variable, numbered in its order
    device, lock = gpu.claim_gpu(str(tmp_path))
    assert device == 0 and (tmp_path / "gpu-5.lock").exists()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # dask-cuda: this worker's one GPU
    assert gpu.claim_gpu(str(tmp_path)) == (0, None)


def test_the_device_plugin_gives_each_worker_its_own_gpu(monkeypatch, tmp_path):
    """Workers set up on one host take distinct GPUs (their plugins hold the claims), whatever
    their names, not device 0 for all."""
    import tempfile

    import faiss

    import pipeline.backends.worker as worker_mod
    from pipeline.backends.gpu import GpuBackend

    class FakeState:
        nthreads = 1

    class FakeWorker:
        def __init__(self, name: str) -> None:
            self.name, self.state = name, FakeState()

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4, raising=False)
    monkeypatch.setattr(worker_mod, "choose", lambda device: ("gpu", "stand-in"))
    monkeypatch.setattr(GpuBackend, "set_threads", lambda self, n: None)
    monkeypatch.setattr(GpuBackend, "describe", lambda self: (f"GPU {self.device}", 0, 0))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    plugins = []
    for name in ("tcp://10.0.0.1:4000", "b", "worker-7", "3"):
        plugin = worker_mod.DevicePlugin("gpu")
        plugin.setup(FakeWorker(name))
        assert isinstance(plugin.backend, GpuBackend)
        plugins.append(plugin)
    assert sorted(p.backend.device for p in plugins) == [0, 1, 2, 3]


def test_submit_with_an_s3_output_stages_and_logs_in_the_shared_scratch_dir(tmp_path):
    """A batch job writing to object storage keeps its scripts, logs and staging folder in
    --scratch-dir (a filesystem the nodes share), and its driver gets the storage_options."""
    from pipeline.config import dump_config

    values = {
        "input": "s3://bucket/emb",
        "output": "s3://bucket/dedup",
        "profile": "slurm",
        "storage_options": {"region": "eu-west-1"},
    }
    with pytest.raises(ConfigError, match="give --scratch-dir on a filesystem the cluster's nodes share"):
        prepare("dedup", parse_config(values))
    sub = prepare("dedup", parse_config({**values, "scratch_dir": str(tmp_path / "shared")}))
    assert str(sub.log_dir).startswith(str(tmp_path / "shared")) and "s3:" not in str(sub.log_dir)
    assert f"--output={sub.log_dir}/driver-%j.log" in sub.script
    assert "storage_options" in dump_config(parse_config(values), storage_options=True)
    assert "storage_options" not in dump_config(parse_config(values))  # never beside the index


def _threads_seen_in_a_task() -> dict[str, object]:
    """What a task's own thread gets: FAISS's OpenMP count, BLAS under the backend's limit, and
    BLAS inside each thread of a list-major walk (one each)."""
    import faiss
    import numpy as np
    from threadpoolctl import threadpool_info

    from pipeline.backends import lists
    from pipeline.backends.worker import worker_device

    def blas() -> list[int]:
        return sorted({int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"})

    seen: dict[str, object] = {}
    walk = lists.walk_lists

    def spy(*args, **kwargs):
        seen.setdefault("walk_blas", blas())
        return walk(*args, **kwargs)

    lists.walk_lists = spy
    try:
        with worker_device() as be:
            seen["faiss"] = faiss.omp_get_max_threads()
            with be._blas():
                seen["blas"] = blas()
            rng = np.random.default_rng(0)
            x = rng.standard_normal((600, 8)).astype(np.float32)
            index = faiss.index_factory(8, "IVF4,Flat")
            index.train(x)
            index.add(x)
            params = faiss.SearchParametersIVF()
            params.nprobe = 2
            be.search(index, x, 5, params)
    finally:
        lists.walk_lists = walk
    return seen


def test_a_task_runs_on_the_threads_the_worker_was_given(dask_address):
    """OpenMP keeps its thread count per calling thread and threadpoolctl obeys only the thread
    that first set a limit, so a count set once while the worker starts would not reach its
    tasks' threads (Dask starts worker processes with one-thread OpenMP and BLAS): each task gets
    FAISS's threads and the backend's BLAS limit in its own thread, and a list-major walk's
    threads one BLAS thread each."""
    from distributed import Client

    from pipeline.backends.worker import install_device

    with Client(dask_address) as client:
        try:
            install_device(client, "cpu", 2)
            for seen in client.gather([client.submit(_threads_seen_in_a_task, pure=False) for _ in range(2)]):
                assert seen == {"faiss": 2, "blas": [2], "walk_blas": [1]}
        finally:
            install_device(client, "cpu", 1)


@pytest.mark.slow
def test_the_gpu_node_check_rehearses_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh --devices cpu: the one-command GPU check runs end to end on small data
    (so it cannot rot before a GPU comes), writing its results under --out."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [
            "bash",
            str(root / "scripts" / "gpu_check.sh"),
            "--devices",
            "cpu",
            "--big",
            "20000x32",
            "--wide",
            "4000x64",
            "--budget-s",
            "240",
            "--out",
            str(out),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHON": sys.executable},
    )
    assert "== summary" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name, rows, device in (("big", 20_000, "cpu"), ("wide", 4_000, "cpu"), ("routed", 20_000, "cpu routed")):
        results = json.loads((out / f"{name}.json").read_text())
        assert [r["device"] for r in results] == [device] and results[0]["rows"] == rows
        assert results[0]["recall"] >= 0.95
    assert not (out / "routed" / "data-20000x32").exists()  # the routed run reads the big run's data


@pytest.mark.slow
def test_a_worker_that_does_not_see_the_output_folder_is_refused_in_one_line(tmp_path, dataset_dir):
    """Workers read and write the job's folders by path. A worker on a machine of its own (here: a
    mount namespace where the output's parent is an empty tmpfs) would fail mid-job with a
    traceback; the job refuses it at the start, in one line naming the worker and the folder."""
    hidden = tmp_path / "jobs"
    hidden.mkdir()
    out = hidden / "out"
    with private_workers(hidden, ["alone"]) as address:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "--input", str(dataset_dir), "--output", str(out)]
            + ["--scheduler-address", address, "--k", "5", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Dask worker alone" in lines[0] and "does not see" in lines[0], proc.stderr
    assert str(out) in lines[0] and "no lock file there" in lines[0]
    left = {p.name for p in out.rglob("*") if p.is_file()}
    assert left <= {".knn-pipeline.lock", ".knn-pipeline.owned"}  # refused before any work: locks only


def test_the_embedded_workers_drop_only_a_heartbeat_that_meets_the_scheduler_closed():
    """At the end of a job the in-process worker may heartbeat once more after the scheduler beside
    it closed: Dask logs that at ERROR with a traceback, after the job's last line."""
    from pipeline.cluster.clients import _QuietFailures

    logger = logging.getLogger("distributed.worker")
    before = list(logger.filters)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, (), None)

    try:
        logger.filters[:] = []
        _QuietFailures().setup(object())
        _QuietFailures().setup(object())  # a worker set up again gains no second filter
        assert len(logger.filters) == 2
        assert not logger.filter(record("Failed to communicate with scheduler during heartbeat."))
        assert logger.filter(record("Unexpected exception during heartbeat. Closing worker."))
        assert logger.filter(record("Failed to communicate with scheduler"))
    finally:
        logger.filters[:] = before


@pytest.mark.parametrize("workers", [1, 2])
def test_the_embedded_workers_run_without_dasks_statistical_profiler(workers):
    """Dask's profiler takes the GIL every 10 ms for a dashboard page the tool never reads; off on
    the in-process worker and on worker processes alike."""
    from pipeline.cluster.clients import dask_client
    from pipeline.config import ClusterSpec

    def profiled(dask_worker):
        return "profile" in dask_worker.periodic_callbacks

    with dask_client(ClusterSpec(workers=workers, threads_per_worker=1, device="cpu")) as (client, _):
        assert set(client.run(profiled).values()) == {False}


def _pauses_by_private_memory(dask_worker) -> bool:
    return "get_process_memory" in vars(dask_worker.monitor)


def _restarts_by_private_memory(dask_worker) -> bool:
    check = dask_worker.periodic_callbacks["memory_monitor"].callback
    return "PrivateMemoryNanny" in getattr(check, "__qualname__", "")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_embedded_workers_and_nannies_judge_private_memory(workers):
    """Mapped lists and row store pages do not pause or restart the embedded cluster's workers."""
    from pipeline.cluster.clients import dask_client
    from pipeline.config import ClusterSpec

    with dask_client(ClusterSpec(workers=workers, threads_per_worker=1, device="cpu")) as (client, _):
        assert set(client.run(_pauses_by_private_memory).values()) == {True}
        if workers > 1:  # one worker runs in the driver's process, without a nanny
            assert set(client.run(_restarts_by_private_memory, nanny=True).values()) == {True}


def test_a_joined_cluster_judges_private_memory_for_the_job_only(dask_address):
    """A joined scheduler's workers, like worker jobs on Slurm, hold limits below the index as
    readily as the embedded ones: its workers and nannies judge private memory while the job runs,
    and Dask's own checks are back once it ends."""
    from distributed import Client

    from pipeline.cluster.clients import dask_client
    from pipeline.config import ClusterSpec

    spec = ClusterSpec(scheduler_address=dask_address, kind="address", threads_per_worker=1, device="cpu")
    with dask_client(spec) as (client, _):
        assert set(client.run(_pauses_by_private_memory).values()) == {True}
        assert set(client.run(_restarts_by_private_memory, nanny=True).values()) == {True}
    with Client(dask_address) as client:
        assert set(client.run(_pauses_by_private_memory).values()) == {False}
        assert set(client.run(_restarts_by_private_memory, nanny=True).values()) == {False}
        assert client.submit(sum, [1, 2], pure=False).result() == 3  # Dask's checks run again


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Weighted:
    """A task record holding a large input many records share, and a small one of its own."""

    queries: np.ndarray
    weights: np.ndarray

    def run(self) -> float:
        return float((self.queries @ self.weights).sum())


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Doubles:
    queries: np.ndarray

    def run(self) -> None:
        np.multiply(self.queries, 2, out=self.queries)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Pieces:
    store: Any

    def run(self) -> tuple[int, int]:
        if hasattr(self.store, "groups"):  # a routed join's layout
            return len(self.store.groups), self.store.groups[-1].index + 1
        return len(self.store.starts), self.store.rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Items:
    items: tuple[int, ...]

    def run(self) -> tuple[int, int]:
        return len(self.items), sum(self.items)


def _records_bytes(calls: list[tuple[Any, tuple[Any, ...]]]) -> int:
    """The array bytes the submitted calls carried: the records' fields and shared inputs alike."""
    total = 0
    for _, args in calls:
        for arg in args:
            values = [getattr(arg, f.name) for f in dataclasses.fields(arg)] if dataclasses.is_dataclass(arg) else [arg]
            total += sum(v.nbytes for v in values if isinstance(v, np.ndarray))
    return total


def test_a_large_task_input_goes_to_the_cluster_once_for_every_record_that_holds_it(dask_address, monkeypatch):
    """Records holding one large array (a recall sample, say, in a task per stored piece) send it
    once, not once per record; each record gets it back, read-only (every task of a worker holds
    the same one), and a record that would change it fails loudly instead of changing the others'."""
    from distributed import Client

    from pipeline.runtime import runner

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((512, 256)).astype(np.float32)  # 512 KiB
    weights = [rng.standard_normal(256).astype(np.float32) for _ in range(20)]
    calls: list[tuple[Any, tuple[Any, ...]]] = []
    with Client(dask_address) as client:
        real = client.submit
        monkeypatch.setattr(client, "submit", lambda fn, *a, **kw: calls.append((fn, a)) or real(fn, *a, **kw))
        records = [_Weighted(queries=queries, weights=w) for w in weights]
        got = runner.gather(client, [runner.submit(client, r, "t") for r in records])
        assert got == pytest.approx([float((queries @ w).sum()) for w in weights], rel=1e-4)
        assert queries.nbytes <= _records_bytes(calls) < queries.nbytes + 21 * weights[0].nbytes + 1024
        with pytest.raises(ValueError, match="read-only"):
            runner.result_of(runner.submit(client, _Doubles(queries=queries), "t"))
        small = np.ones(8, dtype=np.float32)
        runner.result_of(runner.submit(client, _Doubles(queries=small), "t"))  # sent in the record: its own copy
    assert np.array_equal(small, np.ones(8, dtype=np.float32))


def test_a_store_of_many_pieces_goes_to_the_cluster_once(dask_address, monkeypatch, tmp_path):
    """A row store's tables grow with its pieces (23,000 pieces of 128 MiB at 10^9 x 768): one
    of thousands of pieces is sent once for all the records that hold it; one of a few pieces
    travels in each record as before. So does a tuple of thousands of items."""
    from distributed import Client

    from pipeline.io.store import RowStore
    from pipeline.runtime import runner
    from pipeline.search import routed

    many = RowStore(tmp_path, np.arange(4000, dtype=np.int64) * 10, 40_000, live=tuple(range(0, 4000, 2)))
    few = RowStore(tmp_path, np.arange(4, dtype=np.int64) * 10, 40)
    sent: list[Any] = []
    with Client(dask_address) as client:
        real = client.submit
        monkeypatch.setattr(client, "submit", lambda fn, *a, **kw: sent.append(a[0]) or real(fn, *a, **kw))
        assert (
            runner.gather(client, [runner.submit(client, _Pieces(store=many), "t") for _ in range(5)])
            == [(4000, 20_000)] * 5
        )
        assert sum(isinstance(a, RowStore) for a in sent) == 1  # once, in a task of its own
        sent.clear()
        assert runner.result_of(runner.submit(client, _Pieces(store=few), "t")) == (4, 40)
        assert isinstance(sent[0], _Pieces) and sent[0].store is few
        sent.clear()
        pieces = tuple(range(3000))  # a routed score task's query pieces, one task a list group
        assert (
            runner.gather(client, [runner.submit(client, _Items(items=pieces), "t") for _ in range(4)])
            == [(3000, sum(pieces))] * 4
        )
        assert sum(a is pieces for a in sent) == 1 and all(a.items == () for a in sent if isinstance(a, _Items))
        sent.clear()
        groups = tuple(routed.ListGroup(i, 10 * i, 10 * i + 10, 100) for i in range(3000))
        layout = routed.RoutedLayout(str(tmp_path), groups, 8, 11, True)  # every route, score and join task holds it
        assert (
            runner.gather(client, [runner.submit(client, _Pieces(store=layout), "t") for _ in range(3)])
            == [(3000, 3000)] * 3
        )
        assert sum(a is layout for a in sent) == 1


@pytest.mark.slow
def test_a_shared_input_lost_with_its_worker_is_made_again(tmp_path):
    """The worker holding a shared input dies (killed, or restarted by its nanny for memory):
    the records still to run get it again, from its own task, instead of failing."""
    from distributed import Client, LocalCluster

    from pipeline.runtime import runner

    queries = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
    w = np.ones(256, dtype=np.float32)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                     silence_logs=logging.ERROR) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        want = float((queries @ w).sum())
        first = runner.submit(client, _Weighted(queries=queries, weights=w), "t")
        assert runner.result_of(first) == pytest.approx(want)
        holders = {addr for addrs in client.who_has().values() for addr in addrs}
        assert holders
        with contextlib.suppress(Exception):
            client.run(os._exit, 1, workers=list(holders))
        futures = [runner.submit(client, _Weighted(queries=queries, weights=w * i), "t") for i in range(1, 5)]
        got = runner.gather(client, futures)
    assert got == pytest.approx([want * i for i in range(1, 5)], rel=1e-4)


def _map_and_touch(path: str, seconds: float) -> int:
    """Map a file, touch every page (resident, file-backed) and hold it a while."""
    import mmap
    import time

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        total = sum(mapped[i] for i in range(0, len(mapped), 4096))
        time.sleep(seconds)
    return total


def _allocate(nbytes: int, seconds: float) -> int:
    import time

    held = np.ones(nbytes, dtype=np.uint8)  # private pages
    time.sleep(seconds)
    return int(held[::4096].sum())


@pytest.mark.slow
def test_a_nanny_restarts_a_worker_for_its_private_memory_not_its_mapped_pages(tmp_path):
    """A worker whose resident memory is mostly a mapped file (the index's lists, the row store) is
    not restarted by its nanny for it: 4 workers of 800 MiB joining a 0.95 GiB index were, within
    0.1 s of the recall stage. One that holds as much private memory still is."""
    import dask
    from distributed import Client, KilledWorker, LocalCluster

    from pipeline.cluster.clients import PrivateMemory, PrivateMemoryNanny

    big = tmp_path / "lists.bin"
    big.write_bytes(b"\1" * (320 << 20))
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True, memory_limit="300MiB",
                     host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.register_plugin(PrivateMemory(), name="private")
        client.register_plugin(PrivateMemoryNanny(), name="private-nanny")
        assert client.submit(_map_and_touch, str(big), 1.5, pure=False).result() == 320 << 8
        with pytest.raises(KilledWorker):
            client.submit(_allocate, 320 << 20, 1.5, pure=False).result()
