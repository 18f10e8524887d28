"""The import graph of our packages: no cycles, and nothing imports upward.

Layers, top to bottom (a package may import its own layer's package and any lower layer):

    cli                         the command line; nothing imports it
    evaluation                  boards, sweeps, judges, reports
    serve                       the HTTP service on Ray Serve
    train                       the training job on Ray Train
    klein, gemini, cluster      the ground floor: the model, the text stage, Ray pools and storage
    contracts                   ids, storage keys, the manifest, the trigger format, K-LoRA defaults
    klein_style_client          the HTTP contract's models and the client: imports none of ours (httpx + pydantic)

Among the ground packages (as the code stood when the layers were drawn): `klein` and `cluster` import none of
ours but `contracts`; `gemini` may also import `klein` (the judge scores style with klein's style features)
and `cluster` (the Gemini cache lives in `Storage`); nothing on the ground imports `gemini`. `bench/` sits beside `cli`
at the top (it times the product's own code and nothing imports it).

Every import counts, at the top of a module or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"cli": 5, "bench": 5, "evaluation": 4, "serve": 3, "train": 2, "klein": 1, "gemini": 1, "cluster": 1,
         "contracts": 0, "klein_style_client": 0}
# what each ground package may import besides itself and contracts
GROUND_ALLOWED = {"klein": set(), "gemini": {"klein", "cluster"}, "cluster": set()}
TOP_ONLY = {"cli", "bench"}  # nothing else imports these


def _package_of(module: str) -> str | None:
    head = module.split(".")[0]
    return head if head in LAYER else None


def _modules() -> dict[str, Path]:
    found = {}
    for package in LAYER:
        single = ROOT / f"{package}.py"
        if single.exists():
            found[package] = single
        for path in sorted((ROOT / package).rglob("*.py")) if (ROOT / package).is_dir() else []:
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(p for p in parts if p != "__init__") if parts[-1] == "__init__" else ".".join(parts)] = path
    return found


def _imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, inside functions too; relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
    return out


def import_graph() -> dict[str, list[tuple[str, str, int]]]:
    """package -> [(importing module, imported module, line)] for imports between our packages."""
    graph: dict[str, list[tuple[str, str, int]]] = {p: [] for p in LAYER}
    for module, path in _modules().items():
        source = _package_of(module)
        for target, line in _imports(module, path):
            dest = _package_of(target)
            if dest is not None and dest != source:
                graph[source].append((module, target, line))
    return graph


def test_the_graph_is_read():
    graph = import_graph()
    assert any(target.startswith("klein") for _, target, _ in graph["train"])  # train builds on klein
    assert any(module == "cli.images" for module, _, _ in graph["cli"])


def test_nothing_imports_upward():
    problems = []
    for package, edges in import_graph().items():
        for module, target, line in edges:
            dest = _package_of(target)
            if dest in TOP_ONLY:
                problems.append(f"{module}:{line} imports {target}: nothing imports {dest}")
            elif LAYER[dest] > LAYER[package]:
                problems.append(f"{module}:{line} imports {target}, a higher layer ({dest} over {package})")
            elif LAYER[dest] == LAYER[package] and dest not in GROUND_ALLOWED.get(package, {dest}):
                problems.append(f"{module}:{line} imports {target}: {package} may import only "
                                f"{sorted(GROUND_ALLOWED[package]) or 'contracts'} on the ground floor")
    assert not problems, "\n".join(problems)


def test_the_client_imports_none_of_ours():
    """klein_style_client ships to users who have none of the rest (tests/test_client.py checks its imports too)."""
    graph = import_graph()
    assert not graph["klein_style_client"]
    assert any(target.startswith("klein_style_client") for _, target, _ in graph["serve"])


def test_no_cycles_between_packages():
    edges = {p: {_package_of(t) for _, t, _ in e} for p, e in import_graph().items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(edges[node]):
            if seen.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt)
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for package in LAYER:
        if package not in seen:
            visit(package, [package])


def test_the_graph_check_catches_an_upward_import(tmp_path):
    """The checker itself: a `train` module importing `serve` inside a function is reported."""
    fake = tmp_path / "train"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from serve.app import build_app\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        with pytest.raises(AssertionError, match=r"train.bad:2 imports serve.app, a higher layer"):
            test_nothing_imports_upward()
    finally:
        ROOT = saved
