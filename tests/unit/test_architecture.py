"""The package's shape: no import cycles in alignment/, no private name used outside its module,
no Prefect in the library (alignment/ is importable without it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_imports(path: Path, package: str) -> set[str]:
    """The ``package`` modules a file imports, at any depth (lazy imports in functions count: they
    run too), except under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
               for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == package}
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    files = {f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return {name: module_imports(path, package) & set(files) - {name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's members once (Tarjan's strongly connected components of size > 1)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_library():
    assert cycles(import_graph("alignment")) == []


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in [*(ROOT / "alignment").glob("*.py"), *(ROOT / "flows").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("alignment", "flows"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert offenders == []


def test_the_library_does_not_import_prefect():
    assert [p.name for p in (ROOT / "alignment").glob("*.py")
            if any(m.split(".")[0] == "prefect" for m in module_imports(p, "prefect"))] == []


def test_a_wheel_carries_the_prompt_templates(tmp_path):
    """A non-editable install finds the templates: build the wheel, import the package from it
    (outside the checkout), render every template and plan a shipped recipe with its CLI."""
    import shutil
    import subprocess
    import sys
    import zipfile

    build = tmp_path / "build-src"  # a copy: building in the checkout would leave build/ there
    for rel in ("alignment", "flows", "prompts"):
        shutil.copytree(ROOT / rel, build / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / rel, build / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(build),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("selfalign-*.whl"))
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    probe = ("import alignment.prompts as p, pathlib; "
             "assert pathlib.Path(p.__file__).is_relative_to(pathlib.Path.cwd()), p.__file__; "
             "names = p.available(); assert {'judge', 'meta_judge', 'self_instruct'} <= set(names), names; "
             "print(p.render('judge', **{v: 'x' for v in p.declared_variables('judge')})[:20])")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=installed, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    # The installed CLI plans a shipped recipe (the stage lists and their modules are in the wheel).
    plan = subprocess.run([sys.executable, "-c", "import sys, flows.cli as c; sys.exit(c.main(sys.argv[1:]))", "plan",
                           str(ROOT / "recipes" / "tiny-meta-rewarding.yaml")], cwd=installed, capture_output=True,
                          text=True, env=env)
    assert plan.returncode == 0, plan.stderr
    assert "meta_judge" in plan.stdout and "iteration 2" in plan.stdout


def test_the_installed_packages_carry_their_bytecode():
    """`make install` compiles the packages' bytecode (uv does not by default; pip does). Where
    PYTHONDONTWRITEBYTECODE is set (this project's CI machine, many container images) Python never
    writes it, so every process compiled what it imported from source, at every start: the imports
    of a DPO job (torch, transformers, TRL, Prefect) took 28.8 s instead of 14.0 s on one core."""
    import importlib.util

    for name in ("torch", "transformers", "trl", "prefect", "vllm"):
        spec = importlib.util.find_spec(name)
        if spec is None:  # vllm: not in every install
            continue
        cached = Path(importlib.util.cache_from_source(spec.origin))
        # `make install` over a venv whose packages are all there installs (and compiles) nothing.
        assert cached.is_file(), f"{name} has no compiled bytecode ({cached}): rebuild the venv, `make clean install`"
