"""Shape rules the code keeps (issue 27): the training loop is a few named steps, none long."""
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
