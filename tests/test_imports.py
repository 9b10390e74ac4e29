import subprocess
import sys


def test_import_distill_is_light():
    code = ("import sys, distill; heavy = [m for m in ('torch', 'timm', 'transformers', 'open_clip', 'accelerate') "
            "if m in sys.modules]; print(heavy); assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_help_is_instant_without_torch():
    code = ("import sys\nfrom distill.cli import main\ntry:\n    main(['fit', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'transformers', 'open_clip') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: distill fit" in out.stdout, out.stdout + out.stderr


def test_public_names_resolve():
    import distill

    for name in ("load_teacher", "create_student", "load_student", "Distiller", "Tuner"):
        assert callable(getattr(distill, name))


MOVED = [  # (old module, name, new module): importable from the old place for one release, with a warning
    ("distill.students", "load_student", "distill.interop"),
    ("distill.students.pair", "pair_with_teacher_text", "distill.interop.pair"),
    ("distill.data", "SkipLog", "distill.run"),
    ("distill.pack", "pack_images", "distill.data.packed"),
    ("distill.pack", "PackedImages", "distill.data.packed"),
    ("distill.trainer", "make_optimizer", "distill.optim"),
    ("distill.trainer", "NonFiniteLossError", "distill.errors"),
    ("distill.trainer", "image_reader", "distill.data.packed"),
    ("distill.loop", "make_loader_factory", "distill.data.sampler"),
    ("distill.loop", "data_fingerprint", "distill.run"),
    ("distill.cli", "teacher_from_identity", "distill.teachers"),
]


def test_moved_names_still_import_from_their_old_place_with_a_warning():
    import importlib

    import pytest

    for old, name, new in MOVED:
        with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to {new}"):
            value = getattr(importlib.import_module(old), name)
        assert value is getattr(importlib.import_module(new), name), (old, name)


def test_the_package_has_no_import_loop():
    """Every import among distill's modules (lazy ones too) points one way: no module can be understood only
    together with another that imports it back."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    mods = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (root / "distill").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        base = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                parts = base[:len(base) - node.level + 1] if node.level else []
                target = ".".join(parts + ([node.module] if node.module else [])) if node.level else node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                target, names = "", [a.name for a in node.names]
            else:
                continue
            for t in names + [target]:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t.startswith("distill"):
                    graph[m].add(t)
    seen, stack, on, index, low, loops = {}, [], set(), [0], {}, []

    def visit(v):  # Tarjan's strongly connected components
        seen[v] = low[v] = index[0]
        index[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in seen:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], seen[w])
        if low[v] == seen[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in graph:
        if v not in seen:
            visit(v)
    assert not loops, loops
