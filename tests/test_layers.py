"""Dependencies point one way (docs/design.md, "Layers"): the kernel launchers (sora_fast.triton, sora_fast.cuda)
and the references (sora_fast.reference) never import the layers above them: sora_fast.ops, models,
training or integrations, not even lazily inside a function."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sora_fast"
LOWER = ("triton", "cuda", "reference")
FORBIDDEN = tuple(f"sora_fast.{name}" for name in ("ops", "models", "training", "integrations"))


def _lower_modules():
    for layer in LOWER:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path.name == "__init__.py"


def _is_forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def _imported_names(tree: ast.AST, module: str, is_package: bool):
    """(line, absolute module name) of every import in the tree, at any depth: ``import a.b``,
    ``from a import b`` (both ``a`` and ``a.b``: b may be a submodule), relative forms resolved against
    ``module``, and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def test_scan_finds_the_modules():
    found = {module for _, module, _ in _lower_modules()}
    for expected in ("sora_fast.triton.attention", "sora_fast.triton.conv3d", "sora_fast.cuda.launchers",
                     "sora_fast.reference.attention", "sora_fast.reference.rope", "sora_fast.reference"):
        assert expected in found


def test_scan_sees_every_import_form():
    """The scanner itself: relative, absolute, nested in functions, and importlib with a literal."""
    src = textwrap.dedent("""
        from .. import ops
        def f():
            from ..models.dit import DiT
            import sora_fast.training.flow
            importlib.import_module("sora_fast.integrations.diffusers")
        from ..reference import attention
    """)
    names = [n for _, n in _imported_names(ast.parse(src), "sora_fast.triton.attention", False)]
    assert [n for n in names if _is_forbidden(n)] == [
        "sora_fast.ops", "sora_fast.models.dit", "sora_fast.models.dit.DiT", "sora_fast.training.flow",
        "sora_fast.integrations.diffusers"]
    assert not _is_forbidden("sora_fast.reference.attention") and not _is_forbidden("sora_fast.opsx")


@pytest.mark.parametrize("path,module,is_package", list(_lower_modules()),
                         ids=[m for _, m, _ in _lower_modules()])
def test_lower_layers_import_nothing_above(path, module, is_package):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
           for line, name in _imported_names(tree, module, is_package) if _is_forbidden(name)]
    assert not bad, "a lower layer imports a layer above it:\n" + "\n".join(bad)


# sora_fast/__init__.py imports sora_fast.ops (the package's front door), so the subprocess stands in a
# bare package object for it: importing the lower modules then loads only what they import themselves.
_PROBE = textwrap.dedent("""
    import importlib, pkgutil, sys, types
    root = types.ModuleType("sora_fast")
    root.__path__ = [{package!r}]
    root.__package__ = "sora_fast"
    sys.modules["sora_fast"] = root
    modules = []
    for layer in {lower!r}:
        pkg = importlib.import_module("sora_fast." + layer)
        modules.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
            modules.append(info.name)
    loaded = sorted(m for m in sys.modules if m.startswith("sora_fast"))
    print("imported:", " ".join(modules))
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in {forbidden!r})]
    print("forbidden:", " ".join(bad))
""")


def test_importing_lower_layers_loads_nothing_above():
    code = _PROBE.format(package=str(PACKAGE), lower=LOWER, forbidden=FORBIDDEN)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines() if ":" in line)
    imported = lines["imported"].split()
    for expected in ("sora_fast.triton.attention", "sora_fast.triton.conv3d", "sora_fast.cuda.launchers",
                     "sora_fast.reference.attention"):
        assert expected in imported
    assert lines["forbidden"].split() == [], f"importing the lower layers loaded {lines['forbidden']}"
