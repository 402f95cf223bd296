"""The layout rules of ../shared/STYLE.md, checked on the source (each rule fails with the place that breaks it).

- imports point from thighnode/ outward: scp/, pipeline/ and dicomout/ never import thighnode/;
  scp/ imports neither pipeline/ nor dicomout/; pipeline/ never imports pynetdicom or highdicom;
  nothing on the node's data path imports the model kit or the research analyses;
- logging is configured only in thighnode/cli.py;
- no module over 700 lines and no function over 80 lines in the project's packages;
- no ``python -m`` entry points in the packages: the one command line is ``thighnode``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("thighnode", "scp", "pipeline", "dicomout", "modelkit", "research")
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80

# package -> top-level modules it must not import
FORBIDDEN = {
    "scp": {"thighnode", "pipeline", "dicomout", "modelkit", "research"},
    "pipeline": {"thighnode", "scp", "dicomout", "modelkit", "research", "pynetdicom", "highdicom"},
    "dicomout": {"thighnode", "modelkit", "research"},
    "modelkit": {"thighnode", "research"},
    "research": {"modelkit"},
}
# research reads the results store's rows (STYLE.md); nothing else of the composition root
RESEARCH_MAY_IMPORT_FROM_THIGHNODE = {"thighnode.results"}
CLI = REPO / "thighnode" / "cli.py"


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _all_modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in _modules(pkg)]


def _imported_modules(tree: ast.AST) -> set[str]:
    """Dotted names of every module imported, inside functions too."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _imported_roots(tree: ast.AST) -> set[str]:
    """Top-level names of every import in the module, inside functions too."""
    return {name.split(".")[0] for name in _imported_modules(tree)}


def test_every_package_exists() -> None:
    missing = [pkg for pkg in PACKAGES if not (REPO / pkg / "__init__.py").is_file()]
    assert not missing, f"packages without __init__.py: {missing}"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_outward_from_the_composition_root(package: str) -> None:
    wrong = []
    for path in _modules(package):
        roots = _imported_roots(ast.parse(path.read_text(encoding="utf-8")))
        for name in sorted(roots & FORBIDDEN[package]):
            wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_research_reads_only_the_results_store_of_the_composition_root() -> None:
    wrong = []
    for path in _modules("research"):
        for name in sorted(_imported_modules(ast.parse(path.read_text(encoding="utf-8")))):
            if name.split(".")[0] == "thighnode" and name not in RESEARCH_MAY_IMPORT_FROM_THIGHNODE:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_node_runtime_never_imports_the_model_kit_or_research() -> None:
    wrong = []
    for path in _modules("thighnode"):
        if path == CLI or path.name.startswith("cli_"):
            continue  # the command line routes to the model kit and research, lazily
        roots = _imported_roots(ast.parse(path.read_text(encoding="utf-8")))
        wrong += [f"{path.relative_to(REPO)} imports {n}" for n in sorted(roots & {"modelkit", "research"})]
    assert not wrong, "\n".join(wrong)


def test_logging_is_configured_only_in_the_cli() -> None:
    wrong = []
    for path in _all_modules():
        if path == CLI:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr in ("basicConfig", "addHandler", "dictConfig", "fileConfig"):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} calls {node.func.attr}")
    assert not wrong, "\n".join(wrong)


def test_no_module_runs_as_a_script() -> None:
    """One command line: no package module has its own ``if __name__ == "__main__"`` (thighnode/__main__.py
    is the ``python -m thighnode`` spelling of that command line)."""
    wrong = []
    for path in _all_modules():
        if path == REPO / "thighnode" / "__main__.py" or path == CLI:
            continue
        if '__name__ == "__main__"' in path.read_text(encoding="utf-8"):
            wrong.append(str(path.relative_to(REPO)))
    assert not wrong, f"modules with their own entry point: {wrong}"


def test_no_module_is_longer_than_the_limit() -> None:
    long = []
    for path in _all_modules():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(REPO)}: {n} lines")
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_is_longer_than_the_limit() -> None:
    long = []
    for path in _all_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The import walker sees an import inside a function, and the length rule counts a long one."""
    source = "def f():\n    import thighnode.jobs\n" + "    x = 1\n" * 90
    tree = ast.parse(source)
    assert "thighnode" in _imported_roots(tree)
    func = tree.body[0]
    assert func.end_lineno - func.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
