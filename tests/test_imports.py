"""Every import in the package and its tests resolves to the standard library, a declared
dependency or a declared extra, so a missing declaration fails here, not on a user's first run."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Installed with a declared dependency, always (a hard requirement of it).
PROVIDED_BY = {"tokenizers": "transformers", "huggingface_hub": "transformers"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_import_is_declared():
    deps, distributions = declared(), packages_distributions()
    local = {"sparsellm"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    missing = []
    for path in sorted([*ROOT.glob("sparsellm/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        for name in top_level_imports(path):
            if name in sys.stdlib_module_names or name in local or name == "__future__":
                continue
            dists = {canonical(d) for d in distributions.get(name, [name])}
            if not dists & deps and canonical(PROVIDED_BY.get(name, name)) not in deps:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, "imports without a declared dependency or extra: " + ", ".join(missing)


def test_the_check_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nimport numpy_does_not_exist.sub\nfrom . import x\n")
    assert top_level_imports(module) == {"os", "numpy_does_not_exist"}
    assert "numpy-does-not-exist" not in declared()
