"""The package's layout: no import circles among nca_fast's modules (imports inside functions count
too), no nca_fast import pushed into a function, and Triton kernel files that import only Triton."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nca_fast"
KERNEL_FILES = ("kernels/step.py", "kernels/step_backward.py", "kernels/decode.py", "kernels/pixel_shuffle.py",
                "kernels/operand.py")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def _imports(path: Path):
    """(target module, imported inside a function) for every import of an nca_fast module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, inner) for a in child.names if a.name.split(".")[0] == "nca_fast")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                if base.split(".")[0] == "nca_fast":
                    for a in child.names:
                        sub = f"{base}.{a.name}"
                        out.append((sub if _is_module(sub) else base, inner))
            visit(child, inner)

    visit(tree, False)
    return name, out


def _graph():
    graph, inner = {}, []
    for path in sorted(PACKAGE.rglob("*.py")):
        name, imports = _imports(path)
        graph.setdefault(name, set())
        for target, in_function in imports:
            if target != name:
                graph[name].add(target)
            if in_function:
                inner.append(f"{name} imports {target} inside a function")
    return graph, inner


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_no_import_circles():
    graph, _ = _graph()
    assert len(graph) > 30  # the walk found the package
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_circle_detection_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_nca_fast_import_inside_functions():
    _, inner = _graph()
    assert inner == []


def test_kernel_files_import_only_triton():
    for rel in KERNEL_FILES:
        tree = ast.parse((PACKAGE / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] == "triton" for a in node.names), (rel, ast.dump(node))
            elif isinstance(node, ast.ImportFrom):
                ok = node.module == "__future__" or (node.level == 0 and node.module.split(".")[0] == "triton") \
                    or (node.level == 1 and f"kernels/{node.module}.py" in KERNEL_FILES)
                assert ok, (rel, ast.dump(node))
