"""The packages' layers, one way, read from every module's import statements (ast, nothing is run):

    hy_edge_format (the file contract)   <- hy_edge_convert, edge_runtime
    hy_edge_ops (kernels)                 <- hy_edge_convert, edge_runtime
    edge_runtime's library                <- its front doors (CLI, server)

The contract imports only the standard library and numpy; the kernels only numpy, numba and llvmlite; the
runtime library never imports the CLI, the server or the converter, not even inside a function; the
converter imports the runtime only where listed below, inside a function. And importing the converter
leaves the process as it was: no edge_runtime, so no JIT-cache set-up in os.environ, no numba patched."""

from __future__ import annotations

import ast
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hy_edge_format import errors

import edge_runtime

REPO = Path(__file__).resolve().parents[1]

# edge_runtime's front doors: they sit on top and may import everything. Every other module of the package
# is runtime library (a new module is library unless it is named here).
FRONT_DOORS = {"__main__", "entry", "cli", "serve"}  # modules and folders: edge_runtime/cli/, edge_runtime/serve/

# Imports of the runtime by the converter, each inside a function (never at module level), with the reason.
CONVERTER_LAZY_RUNTIME = {
    # the calibration text is tokenized by the model's own tokenizer, the runtime's (a calibrated conversion
    # only; importing it configures numba's kernel cache, as any runtime import does)
    ("hy_edge_convert.calibrate", "edge_runtime.text.tokenizer"),
}


def packages() -> dict[str, Path]:
    """Installed package name -> its folder in this checkout, from setup.cfg's package_dir."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = [ln.split("=") for ln in cfg["options"]["package_dir"].strip().splitlines()]
    return {name.strip(): REPO / folder.strip() for name, folder in lines}


def is_front_door(name: str) -> bool:
    """Whether a name in edge_runtime (a module, or a name in one) belongs to a front door."""
    parts = name.split(".")
    return len(parts) > 1 and parts[1] in FRONT_DOORS


def imports_of(path: Path, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(dotted name imported, inside a function) for every import in the file. `from a import b` yields
    both a and a.b (b may be a module); relative names are resolved against `module`. Strings handed to
    import_module (edge_runtime's lazy names) count as imports when the file calls it."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if is_package else module.rsplit(".", 1)[0]
    found: list[tuple[str, bool]] = []

    def resolve(level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        base = package.rsplit(".", level - 1)[0] if level > 1 else package
        return f"{base}.{name}" if name else base

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.level, child.module)
                found.append((base, in_function))
                found.extend((f"{base}.{a.name}", in_function) for a in child.names if a.name != "*")
            visit(child, nested)

    visit(tree, False)
    calls_import_module = any(
        isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == "import_module"
        for n in ast.walk(tree)
    )
    if calls_import_module:
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"\.[A-Za-z_][\w.]*", n.value):
                found.append((resolve(1, n.value[1:]), True))
    return found


def all_imports() -> dict[str, list[tuple[str, bool]]]:
    """Every module of the project's packages (dotted, by installed name) -> its imports."""
    out = {}
    for name, folder in packages().items():
        for path in sorted(folder.rglob("*.py")):
            dotted = ".".join((name, *path.relative_to(folder).with_suffix("").parts))
            module = dotted.removesuffix(".__init__")
            out[module] = imports_of(path, module, path.stem == "__init__")
    return out


def top(name: str) -> str:
    return name.split(".", 1)[0]


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.fixture(scope="module")
def imports():
    found = all_imports()
    assert {"hy_edge_format", "hy_edge_ops", "hy_edge_convert", "edge_runtime"} <= {top(m) for m in found}
    return found


def offenders(imports, package: str, allowed) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in imports.items()
        if in_package(module, package)
        for name, _ in names
        if not allowed(module, name)
    )


def test_the_contract_imports_only_the_standard_library_and_numpy(imports):
    # onnx_header reads the .onnx header without onnx on purpose (a run never imports onnx)
    def allowed(module, name):
        return top(name) in sys.stdlib_module_names or top(name) in ("numpy", "hy_edge_format")

    assert offenders(imports, "hy_edge_format", allowed) == []
    assert any(m.startswith("hy_edge_format.") for m in imports)  # the package was read


def test_the_kernels_import_only_numpy_and_numba(imports):
    def allowed(module, name):
        return top(name) in sys.stdlib_module_names or top(name) in ("numpy", "numba", "llvmlite", "hy_edge_ops")

    assert offenders(imports, "hy_edge_ops", allowed) == []


def test_the_converter_imports_the_runtime_only_where_listed_and_lazily(imports):
    def allowed(module, name):
        if not in_package(name, "edge_runtime"):
            return True
        listed = CONVERTER_LAZY_RUNTIME
        return (module, name) in listed or (module, name.rsplit(".", 1)[0]) in listed  # the module, or a name in it

    assert offenders(imports, "hy_edge_convert", allowed) == []
    at_module_level = sorted(
        f"{module} imports {name} at module level"
        for module, names in imports.items()
        if in_package(module, "hy_edge_convert")
        for name, lazy in names
        if in_package(name, "edge_runtime") and not lazy
    )
    assert at_module_level == []


def test_the_runtime_library_never_imports_its_front_doors_or_the_converter(imports):
    library = [m for m in imports if in_package(m, "edge_runtime") and not is_front_door(m)]
    assert "edge_runtime.model" in library and "edge_runtime.engine.numba_session" in library
    assert "edge_runtime.cli" not in library and "edge_runtime.serve.http" not in library

    def allowed(module, name):
        if in_package(name, "hy_edge_convert"):
            return False
        return not (in_package(name, "edge_runtime") and is_front_door(name))

    bad = [o for o in offenders(imports, "edge_runtime", allowed) if o.split(" ", 1)[0] in library]
    assert bad == []


def test_the_rules_see_a_forbidden_import_inside_a_function(tmp_path):
    """The reader finds what the rules look for: a lazy, relative import of the CLI from a library module."""
    path = tmp_path / "model.py"
    path.write_text("import numpy\n\n\ndef f():\n    from .cli.convert import main\n    from .serve import http\n")
    names = imports_of(path, "edge_runtime.model", False)
    assert ("numpy", False) in names
    assert ("edge_runtime.cli.convert", True) in names and ("edge_runtime.serve.http", True) in names
    assert is_front_door("edge_runtime.cli.convert") and not is_front_door("edge_runtime.model")


def test_importing_the_converter_leaves_the_process_as_it_was():
    code = (
        "import os, sys; before = dict(os.environ); import numba; cache = numba.config.CACHE_DIR;"
        "import hy_edge_convert, hy_edge_format.spec, hy_edge_format.format;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'edge_runtime'));"
        "print(dict(os.environ) == before, numba.config.CACHE_DIR == cache, 'NUMBA_CACHE_DIR' in os.environ)"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # this process set it (conftest)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.splitlines() == ["[]", "True True False"]


def test_the_runtime_still_names_the_contracts_errors():
    """`edge_runtime.HyEdgeError` and its kinds, as users catch them, are the classes the converter raises."""
    assert {"HyEdgeError", "BudgetError", "ModelFileError"} <= set(edge_runtime.__all__)
    assert edge_runtime.HyEdgeError is errors.HyEdgeError
    assert edge_runtime.BudgetError is errors.BudgetError and edge_runtime.ModelFileError is errors.ModelFileError
    assert issubclass(errors.CheckpointError, edge_runtime.HyEdgeError)
