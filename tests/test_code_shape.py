"""Shape rules the code keeps (issue 27): the training loop is a few named steps, none long; kernel
interfaces of at most 36 parameters."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _functions(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    return {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_train_and_every_function_it_calls_are_at_most_80_lines():
    funcs = _functions(os.path.join(ROOT, "tnlib", "train.py"))
    seen, todo = set(), ["train"]
    while todo:  # train, and everything of train.py it reaches through calls by name
        name = todo.pop()
        if name in seen or name not in funcs:
            continue
        seen.add(name)
        node = funcs[name]
        assert node.end_lineno - node.lineno + 1 <= 80, f"{name}: {node.end_lineno - node.lineno + 1} lines"
        todo += [c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
    assert {"_setup", "_build", "_step", "_save_final", "evaluate"} <= seen


def _is_triton_jit(decorator) -> bool:
    d = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(d, ast.Attribute) and d.attr == "jit" and isinstance(d.value, ast.Name) and d.value.id == "triton"


def test_every_triton_kernel_has_at_most_36_parameters():
    """Kernel interfaces that read like their table (issue 27): a tuple of strides per tensor, absent
    tensors as None with their flags from ``@triton.heuristics``, and no ``@triton.jit`` function in
    tnlib/ with more than 36 parameters."""
    counts = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "tnlib")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                for node in _functions(path).values():
                    if any(_is_triton_jit(d) for d in node.decorator_list):
                        a = node.args
                        n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                        counts[f"{os.path.relpath(path, ROOT)}:{node.name}"] = n
    assert len(counts) >= 15 and "tnlib/ops/lightning/kernels.py:_lightning_kernel" in counts, sorted(counts)
    assert "tnlib/ops/lightning/kernels.py:_dkdv_kernel" in counts
    too_many = {k: n for k, n in counts.items() if n > 36}
    assert not too_many, too_many
