"""The package layout's one-way imports (README "Code map"): every module imports only from its own
layer or below, lazy imports inside functions included; `stages` never imports `cascade`."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# cascade's rooms, lowest first; the core is the modules at cascade/'s top plus its run folders
LAYERS = {"core": 0, "runs": 0, "offline": 1, "evaluation": 2, "perf": 2, "toy": 3, "cli": 4, "ui": 4}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cascade":
        return None
    if module == "cascade.__main__":  # `python -m cascade`: an entry point like scripts/
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cascade":  # `from cascade import x`: x is the module imported
                yield from (f"cascade.{a.name}" for a in node.names)
            else:
                yield node.module


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_imports_run_one_way():
    bad = []
    for path in sorted((ROOT / "cascade").rglob("*.py")) + sorted((ROOT / "stages").rglob("*.py")):
        me = _module_name(path)
        for target in _imports(path):
            if me.startswith("stages"):
                if target.split(".")[0] == "cascade":
                    bad.append(f"{me} -> {target}")
                continue
            room = _room(target)
            if room is not None and LAYERS[room] > LAYERS[_room(me)]:
                bad.append(f"{me} ({_room(me)}) -> {target} ({room})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_package_says_what_it_holds():
    for init in (ROOT / "cascade").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) <= 2, f"{init.relative_to(ROOT)} needs a one-line docstring"
