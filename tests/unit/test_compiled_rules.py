"""The compiled modules keep to what mypyc compiles correctly (the rules in dst.compiled).

Each rule is a pattern the interpreter runs fine and the compiled form does not: a test of
behaviour would catch it only where a test happens to take that path (a cancelled request,
an interpreted subclass), so the source itself is checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dst import compiled

SRC = Path(compiled.__file__).resolve().parent.parent


def _tree(module: str) -> ast.Module:
    path = SRC.joinpath(*module.split(".")).with_suffix(".py")
    return ast.parse(path.read_text(), str(path))


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _own_nodes(body: list[ast.stmt]) -> list[ast.AST]:
    """Every node under ``body``, not descending into nested functions or classes."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _SCOPES):
                todo.append(child)
    return out


def bare_raise_after_await(tree: ast.Module) -> list[int]:
    """Lines of a bare ``raise`` that follows an ``await`` in the same ``except`` block."""
    lines = []
    for handler in ast.walk(tree):
        if not isinstance(handler, ast.ExceptHandler):
            continue
        nodes = _own_nodes(handler.body)
        awaits = [n.lineno for n in nodes if isinstance(n, ast.Await)]
        if awaits:
            lines += [
                n.lineno
                for n in nodes
                if isinstance(n, ast.Raise) and n.exc is None and n.lineno > min(awaits)
            ]
    return sorted(lines)


def await_in_finally(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            lines += [n.lineno for n in _own_nodes(node.finalbody) if isinstance(n, ast.Await)]
    return sorted(lines)


@pytest.mark.parametrize("module", compiled.MODULES)
def test_no_bare_raise_after_an_await_in_an_except_block(module: str) -> None:
    assert bare_raise_after_await(_tree(module)) == []


@pytest.mark.parametrize("module", compiled.MODULES)
def test_no_await_in_a_finally_block(module: str) -> None:
    assert await_in_finally(_tree(module)) == []


def test_the_checks_find_what_they_look_for() -> None:
    tree = ast.parse(
        "async def f(x):\n"
        "    try:\n"
        "        await x\n"
        "    except E:\n"
        "        await x\n"
        "        raise\n"
        "    except F as e:\n"
        "        await x\n"
        "        raise e\n"
        "    except G:\n"
        "        raise\n"
        "    except H:\n"
        "        raise\n"
        "        await x\n"
        "    finally:\n"
        "        await x\n"
    )
    assert bare_raise_after_await(tree) == [6]
    assert await_in_finally(tree) == [16]
