"""The package's shape: modules import in one direction, and the product imports no private module of a library;
the tests import their support from testkit/ (or get fixtures from conftest.py), never from each other or bench/."""

import ast
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_flashsd_imports_in_one_direction():
    result = subprocess.run([sys.executable, "scripts/import-graph"], cwd=PROJECT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "engine        -> adapter" in result.stdout  # it read the real graph, not an empty one


def test_the_graph_script_finds_a_circle(tmp_path):
    package = tmp_path / "flashsd"
    package.mkdir()
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import y\n")
    (package / "c.py").write_text("from . import a\n")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "import-graph").write_text((PROJECT / "scripts" / "import-graph").read_text())
    result = subprocess.run([sys.executable, str(scripts / "import-graph")], capture_output=True, text=True)
    assert result.returncode == 1 and "import circle: a -> b -> c -> a" in result.stderr


def test_a_circle_through_a_subpackage_is_found_and_training_never_reaches_into_the_engine(tmp_path):
    package = tmp_path / "flashsd"
    (package / "wing").mkdir(parents=True)
    (package / "a.py").write_text("from .wing import run\n")
    (package / "wing" / "__init__.py").write_text("from .inner import run\n")
    (package / "wing" / "inner.py").write_text("from ..a import x\n")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "import-graph").write_text((PROJECT / "scripts" / "import-graph").read_text())
    result = subprocess.run([sys.executable, str(scripts / "import-graph")], capture_output=True, text=True)
    assert result.returncode == 1 and "a -> wing" in result.stderr and "wing.inner -> a" in result.stderr
    real = subprocess.run([sys.executable, "scripts/import-graph"], cwd=PROJECT, capture_output=True, text=True).stdout
    training = [line for line in real.splitlines() if line.split(" ")[0].split(".")[0] == "training"]
    imported = {name for line in training for name in line.split("-> ")[1].split(", ")}
    assert len(training) >= 4 and "weights" in imported  # it reuses the weights layout...
    assert not {name.split(".")[0] for name in imported} & {"engine", "loras", "batching"}  # ...never the engine's


def test_the_product_imports_no_private_module_of_huggingface_hub_or_cog():
    product = [
        *sorted((PROJECT / "flashsd").rglob("*.py")),
        PROJECT / "predict.py",
        *sorted((PROJECT / "scripts").iterdir()),
    ]
    private = []
    for path in product:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                parts = name.split(".")
                if parts[0] in ("huggingface_hub", "cog", "coglet") and any(p.startswith("_") for p in parts[1:]):
                    private.append(f"{path.name}: {name}")
    assert len(product) > 20 and private == []


def test_every_third_party_module_the_product_imports_is_pinned():
    """A module imported but not pinned (httpx2 was) arrives at whatever version another package drags in."""
    import importlib.metadata
    import re

    pinned = {
        re.split(r"[=<>!~ ]", line)[0].lower().replace("_", "-")
        for line in (PROJECT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    pinned |= {"cog", "coglet"}  # the image's SDK: cog.yaml's build.sdk_version, requirements-dev.txt locally
    distributions = importlib.metadata.packages_distributions()
    product = [
        *sorted((PROJECT / "flashsd").rglob("*.py")),
        PROJECT / "predict.py",
        *sorted((PROJECT / "scripts").iterdir()),
    ]
    unpinned = set()
    for path in product:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("flashsd", "predict"):
                    continue
                dists = {d.lower().replace("_", "-") for d in distributions.get(top, [top])}
                if not dists & pinned:
                    unpinned.add(f"{path.name}: {top}")
    assert unpinned == set()


def imports_of_other_tests_or_bench(folder: Path) -> tuple[list[str], list[str]]:
    """(the modules under `folder`, the imports among them of another module under `folder` or of bench/): by
    package (`tests.x`, `bench.x`), by plain name (`test_x`: pytest puts tests/ on sys.path), relative, or through
    importlib.import_module / __import__ with a literal name."""
    paths = sorted(folder.rglob("*.py"))
    local = {p.stem for p in paths}
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                names = [str(node.args[0].value)]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if name.startswith(".") or top in ("tests", "bench") or top in local:
                    found.append(f"{path.relative_to(folder)}:{node.lineno}: {name}")
    return [str(p.relative_to(folder)) for p in paths], found


def test_no_test_module_imports_another_or_bench():
    modules, found = imports_of_other_tests_or_bench(PROJECT / "tests")
    assert "conftest.py" in modules and "test_structure.py" in modules and len(modules) > 20  # it read the tests
    assert found == [], "shared test support belongs in testkit/ (plain code) or tests/conftest.py (fixtures)"


def test_the_import_check_finds_each_way_of_importing_a_test_module_or_bench(tmp_path):
    (tmp_path / "test_a.py").write_text("import pytest\nfrom testkit.recipes import run_card\nx = 1\n")
    (tmp_path / "test_b.py").write_text(
        "import importlib\n"
        "from tests.test_a import x\n"
        "from test_a import x\n"
        "from . import test_a\n"
        "import bench.soak\n"
        "def f():\n"
        "    from bench.fuzz_http import Generator\n"
        "    return importlib.import_module('bench.pipeline')\n"
    )
    modules, found = imports_of_other_tests_or_bench(tmp_path)
    assert modules == ["test_a.py", "test_b.py"]
    assert found == [
        "test_b.py:2: tests.test_a", "test_b.py:3: test_a", "test_b.py:4: .", "test_b.py:5: bench.soak",
        "test_b.py:7: bench.fuzz_http", "test_b.py:8: bench.pipeline",
    ]  # fmt: skip
