"""The package's layout holds: no import circle among its modules, counting imports inside
functions (a lazy import hides a circle, it does not remove it); no positional walls; every Dask
task a frozen, keyword-only task record submitted through the runner."""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

ROOT = Path(pipeline.__file__).parent


def _imports() -> dict[str, set[str]]:
    names = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        names[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in names else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pipeline")}
        graph[module] = {d for d in deps if d in names and d != module and d != "pipeline"}
    return graph


def test_no_import_circle():
    graph = _imports()
    circles = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def _functions():
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT.parent), node


def test_no_function_takes_more_than_five_parameters_by_position():
    """Past five, parameters are keyword-only (``*``): a call names what it passes."""
    walls = []
    for path, fn in _functions():
        positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
        if len(positional) > 5:
            walls.append(f"{path}:{fn.lineno} {fn.name} ({len(positional)})")
    assert not walls, walls


def test_every_dask_task_goes_through_the_task_seam():
    """Tasks are submitted as task records (``pipeline.runtime.runner``), never as a function with
    a tuple of arguments: ``client.submit`` appears only in the runner."""
    stray = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "runner.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "submit" and isinstance(node.value, ast.Name):
                if node.value.id == "client":
                    stray.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not stray, stray


def test_task_results_are_read_through_the_runner():
    """A task on a machine of its own returns its written files with its result
    (:class:`pipeline.io.nodes.NodeResult`); only the runner's ``result_of``, ``gather`` and
    ``unwrap`` record them, so no module reads a future with ``.result()`` or ``client.gather``."""
    stray = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name in ("runner.py", "progress.py", "parquet.py"):  # watch's result goes to unwrap; a thread pool
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            fn = node.func
            gathered = fn.attr == "gather" and isinstance(fn.value, ast.Name) and fn.value.id == "client"
            awaited = fn.attr == "result" and not node.args and not node.keywords
            if gathered or awaited:
                stray.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not stray, stray


def test_task_records_are_frozen_and_keyword_only():
    """Every class with a ``run`` method below ``pipeline/`` (a task record) is a frozen, keyword-only dataclass."""
    import dataclasses
    import importlib
    import inspect
    import threading

    loose = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "__main__.py":  # runs the CLI
            continue
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = importlib.import_module(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not callable(getattr(cls, "run", None)):
                continue
            if getattr(cls, "_is_protocol", False) or issubclass(cls, threading.Thread):
                continue
            params = getattr(cls, "__dataclass_params__", None)
            fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
            if params is None or not params.frozen or not all(f.kw_only for f in fields):
                loose.append(f"{module.__name__}.{name}")
    assert not loose, loose


# each package of pipeline/ (and top-level module) by level: a module imports only its own level or below
LEVELS = [
    {"kinds", "errors"},
    {"results", "config"},
    {"io"},
    {"runtime"},
    {"backends"},
    {"cluster", "index"},
    {"shuffle"},
    {"search"},
    {"duplicates", "graphs"},
    {"charts", "report"},
    {"jobs"},
    {"api"},
    {"cli"},
    {"pipeline", "__main__"},
]


def test_nothing_imports_upward():
    """The layers of CONTRIBUTING.md's map: a package never imports one above it."""
    level = {name: i for i, names in enumerate(LEVELS) for name in names}

    def package(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    upward = [
        f"{module} -> {dep}"
        for module, deps in _imports().items()
        for dep in deps
        if level[package(dep)] > level[package(module)]
    ]
    assert not upward, upward
    assert {package(m) for m in _imports()} <= set(level), "a new package needs its place in LEVELS"
