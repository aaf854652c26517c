"""The package's rooms and the arrows between them (ARCHITECTURE.md), read from the source with `ast`.

Floors, from the bottom: core (formats, files, devices, metrics), then the rooms that build on
it (training engine, models, ROIs, rescoring, reports), then the stages, then the CLI. An import
may point down or sideways within a floor, never up; a stage imports no other stage; only the
CLI imports stages; and below the CLI every sodtool import stands at the top of its module,
where a reader sees the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sodtool"

CORE = {"sodtool", "sodtool.errors", "sodtool.artefacts", "sodtool.console", "sodtool.device", "sodtool.allocator",
        "sodtool.boxes", "sodtool.coco", "sodtool.store", "sodtool.checkpoint", "sodtool.resample", "sodtool.srmetrics",
        "sodtool.evaluate", "sodtool.figures", "sodtool.losses", "sodtool.slicing", "sodtool.insertion",
        "sodtool.provenance", "sodtool.options", "sodtool.configs"}
ROOMS = {"sodtool.engine", "sodtool.detdata", "sodtool.srdata", "sodtool.rois", "sodtool.testrois",
         "sodtool.rescoring", "sodtool.reports", "sodtool.models"}
TOP = {"sodtool.cli", "sodtool.__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(name: str) -> int:
    if name in CORE or name.startswith("sodtool.configs."):
        return 0
    if name in ROOMS or name.startswith("sodtool.models."):
        return 1
    if name == "sodtool.stages" or name.startswith("sodtool.stages."):
        return 2
    if name in TOP:
        return 3
    raise AssertionError(f"{name} is in no room: add it to tests/test_layout.py and ARCHITECTURE.md")


def is_stage(name: str) -> bool:
    return name.startswith("sodtool.stages.")


def sodtool_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported sodtool module, line, at module top level) for every sodtool import in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sodtool":
            for alias in node.names:
                # `from sodtool import store` imports the module sodtool.store
                sub = f"{node.module}.{alias.name}"
                target = sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else node.module
                found.append((target, node.lineno, id(node) in top_level))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sodtool":
                    found.append((alias.name, node.lineno, id(node) in top_level))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_room():
    for path in MODULES:
        floor(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    me = module_name(path)
    for target, line, _ in sodtool_imports(path):
        if target == me:
            continue
        where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        if is_stage(target):
            assert me in TOP, f"{where}: only the CLI imports stages"
        if is_stage(me):
            assert not is_stage(target), f"{where}: a stage never imports another stage"
        assert floor(target) <= floor(me), f"{where}: an arrow points up"


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p) not in TOP], ids=lambda p: module_name(p))
def test_sodtool_imports_stand_at_the_top(path):
    # The CLI imports its stages inside the commands (torch would slow `sodtool --help`); below
    # it, an import hidden in a function hides an arrow of the graph.
    inner = [line for _, line, top in sodtool_imports(path) if not top]
    assert not inner, f"{path.relative_to(PACKAGE.parent)}: sodtool imports inside functions at lines {inner}"


def test_the_checker_sees_a_stage_importing_a_stage(tmp_path, monkeypatch):
    # The rules above must be able to fail: a fake stage importing another is caught.
    fake = tmp_path / "sodtool" / "stages"
    fake.mkdir(parents=True)
    (fake / "a.py").write_text("from sodtool.stages.b import x\n")
    (fake / "b.py").write_text("x = 1\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", tmp_path / "sodtool")
    with pytest.raises(AssertionError, match="never imports another stage|only the CLI imports stages"):
        test_imports_point_down(fake / "a.py")
