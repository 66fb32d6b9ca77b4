"""The library's imports point one way: nothing below the applications imports them.

Applications (`cli`, `finetuning`, `bench`, `tasks`, `planning`) may import the library; the
library (everything else under `wtacrs`, the package facade `wtacrs/__init__.py` aside, whose lazy
`plan` export is the applications' front door) never imports an application, at module level or
inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wtacrs

APPLICATIONS = ("cli", "finetuning", "bench", "tasks", "planning")
ROOT = Path(wtacrs.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _is_application(module: str) -> bool:
    return any(module == f"wtacrs.{app}" or module.startswith(f"wtacrs.{app}.") for app in APPLICATIONS)


def test_the_library_never_imports_an_application():
    library = [p for p in ROOT.rglob("*.py")
               if p.relative_to(ROOT).parts[0] not in APPLICATIONS and p != ROOT / "__init__.py"]
    assert len(library) > 30  # the walk found the library
    upward = {str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if _is_application(m))
              for p in library}
    assert {path: names for path, names in upward.items() if names} == {}


def test_the_walk_sees_an_upward_import(tmp_path):
    """The check above can fail: a module importing an application is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from wtacrs.cli import main\n")
    assert any(_is_application(m) for m in _imported_modules(module))
