"""Read a Python config file (XTuner/mmengine, InternEvo) without running it.

The file is parsed into an AST and interpreted statement by statement, but only a safe
subset is evaluated: literals, arithmetic and comparisons between known values, names bound
earlier in the same file, `dict(...)` calls and `{...}` literals (so `dict(type=X, ...)`
nesting becomes a plain dict), subscripts of known dicts and lists, f-strings, conditional
expressions, `if` blocks whose test is known, and a few pure builtins (`int`, `float`, `str`,
`bool`, `min`, `max`, `abs`, `round`, `len`). Imported names (and attributes of them, such as
`PROMPT_TEMPLATE.internlm2_chat` or `torch.float16`) are `Opaque`: kept by name, never
imported. Anything else (a call to an imported function, a comprehension, ...) is `Unknown`,
carrying its source text. Nothing in the file is ever executed.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import ConfigError


@dataclass(frozen=True)
class Opaque:
    """An imported name or an attribute of one, e.g. `PROMPT_TEMPLATE.internlm2_chat`."""

    name: str

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Unknown:
    """An expression the reader does not evaluate (its source text)."""

    source: str

    def __str__(self) -> str:
        return self.source


@dataclass
class PyConfig:
    """The names a config file binds, in order, with the line of their last assignment."""

    path: str
    values: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    imports: set[str] = field(default_factory=set)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, what was not read)
    aliases: dict[tuple[int, Any], str] = field(default_factory=dict)  # (id(dict), key) -> the name it was given

    def settings(self) -> list[tuple[str, Any]]:
        """Bound names that are settings, not imports."""
        return [(k, v) for k, v in self.values.items() if k not in self.imports]


BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
BUILTINS = {"int": int, "float": float, "str": str, "bool": bool, "min": min, "max": max, "abs": abs,
            "round": round, "len": len}
MAX_POWER = 4096  # 2**64 is a config value; 10**10**10 is not


class _NotEvaluable(Exception):
    pass


def _known(value) -> bool:
    return not isinstance(value, (Opaque, Unknown))


class _Reader:
    def __init__(self, text: str, path: str):
        self.text = text
        self.config = PyConfig(path=path)

    # ---- statements
    def run(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self.statement(stmt)

    def statement(self, stmt: ast.stmt) -> None:
        cfg = self.config
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                local = alias.asname or alias.name.split(".")[0]
                self.bind(local, Opaque(alias.asname and alias.name or local), stmt.lineno, imported=True)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if alias.name == "*":
                    cfg.skipped.append((stmt.lineno, f"from {'.' * stmt.level}{stmt.module or ''} import * "
                                                     "(settings inherited from another file are not read)"))
                else:
                    self.bind(alias.asname or alias.name, Opaque(alias.name), stmt.lineno, imported=True)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            if stmt.value is None:
                return
            value = self.value(stmt.value)
            for target in stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]:
                self.assign(target, value, stmt)
        elif isinstance(stmt, ast.AugAssign):
            if isinstance(stmt.target, ast.Name):
                old = cfg.values.get(stmt.target.id, Unknown(stmt.target.id))
                value = self.apply(BINARY.get(type(stmt.op)), old, self.value(stmt.value), stmt)
                self.bind(stmt.target.id, value, stmt.lineno)
        elif isinstance(stmt, ast.If):
            test = self.value(stmt.test)
            if _known(test):
                self.run(stmt.body if test else stmt.orelse)
            else:
                cfg.skipped.append((stmt.lineno, f"if {self.source(stmt.test)}: (the condition is not known "
                                                 "without running the file; neither branch was read)"))
        elif isinstance(stmt, ast.With):
            self.run(stmt.body)  # mmengine's `with read_base():` holds imports of base files
        elif isinstance(stmt, ast.Expr):
            return  # docstrings and bare expressions bind nothing
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.bind(stmt.name, Unknown(f"{type(stmt).__name__} {stmt.name}"), stmt.lineno, imported=True)
        else:
            cfg.skipped.append((stmt.lineno, f"a {type(stmt).__name__.lower()} statement (not read)"))

    def assign(self, target: ast.expr, value, stmt: ast.stmt) -> None:
        if isinstance(target, ast.Name):
            self.bind(target.id, value, stmt.lineno)
        elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (tuple, list)) \
                and len(value) == len(target.elts):
            for sub, item in zip(target.elts, value):
                self.assign(sub, item, stmt)
        elif isinstance(target, ast.Subscript):
            container, key = self.value(target.value), self.value(target.slice)
            if isinstance(container, dict) and _known(key):
                container[key] = value
            else:
                self.config.skipped.append((stmt.lineno, f"{self.source(target)} = ... (not read)"))
        else:
            self.config.skipped.append((stmt.lineno, f"{self.source(target)} = ... (not read)"))

    def bind(self, name: str, value, line: int, imported: bool = False) -> None:
        cfg = self.config
        cfg.values.pop(name, None)  # re-binding moves the name to its latest position
        cfg.values[name] = value
        cfg.lines[name] = line
        if imported:
            cfg.imports.add(name)
        else:
            cfg.imports.discard(name)

    # ---- expressions
    def source(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or type(node).__name__

    def value(self, node: ast.expr):
        try:
            return self.evaluate(node)
        except _NotEvaluable:
            return Unknown(self.source(node))

    def evaluate(self, node: ast.expr):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            items = [self.value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, ast.Dict):
            out = {}
            for key, val in zip(node.keys, node.values):
                if key is None:
                    self.merge(out, self.value(val))
                else:
                    name = self.evaluate(key)
                    out[name] = self.value(val)
                    self.alias(out, name, val)
            return out
        if isinstance(node, ast.Name):
            if node.id in self.config.values:
                return self.config.values[node.id]
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            raise _NotEvaluable
        if isinstance(node, ast.Attribute):
            base = self.evaluate(node.value)
            if isinstance(base, Opaque):
                return Opaque(f"{base.name}.{node.attr}")
            raise _NotEvaluable
        if isinstance(node, ast.BinOp):
            return self.apply(BINARY.get(type(node.op)), self.evaluate(node.left), self.evaluate(node.right), node)
        if isinstance(node, ast.UnaryOp):
            operand = self.evaluate(node.operand)
            if not _known(operand) or type(node.op) not in UNARY:
                raise _NotEvaluable
            return UNARY[type(node.op)](operand)
        if isinstance(node, ast.BoolOp):
            values = [self.evaluate(v) for v in node.values]
            if not all(_known(v) for v in values):
                raise _NotEvaluable
            result = values[0]
            for v in values[1:]:
                result = (result and v) if isinstance(node.op, ast.And) else (result or v)
            return result
        if isinstance(node, ast.Compare):
            left = self.evaluate(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                right = self.evaluate(right_node)
                if not (_known(left) and _known(right)):
                    raise _NotEvaluable
                if not COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            test = self.evaluate(node.test)
            if not _known(test):
                raise _NotEvaluable
            return self.evaluate(node.body if test else node.orelse)
        if isinstance(node, ast.Subscript):
            container, key = self.evaluate(node.value), self.evaluate(node.slice)
            try:
                return container[key]
            except (TypeError, KeyError, IndexError):
                raise _NotEvaluable from None
        if isinstance(node, ast.JoinedStr):
            parts = []
            for piece in node.values:
                part = self.evaluate(piece.value) if isinstance(piece, ast.FormattedValue) else piece.value
                if not _known(part) or (isinstance(piece, ast.FormattedValue) and (piece.format_spec or piece.conversion != -1)):
                    raise _NotEvaluable
                parts.append(str(part))
            return "".join(parts)
        if isinstance(node, ast.Call):
            return self.call(node)
        raise _NotEvaluable

    def call(self, node: ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id not in self.config.values:
            if func.id == "dict":
                out = {}
                for arg in node.args:
                    self.merge(out, self.value(arg))
                for kw in node.keywords:
                    if kw.arg is None:
                        self.merge(out, self.value(kw.value))
                    else:
                        out[kw.arg] = self.value(kw.value)
                        self.alias(out, kw.arg, kw.value)
                return out
            if func.id in BUILTINS and not node.keywords:
                args = [self.evaluate(a) for a in node.args]
                if all(_known(a) for a in args):
                    try:
                        return BUILTINS[func.id](*args)
                    except (TypeError, ValueError):
                        pass
        raise _NotEvaluable

    def alias(self, out: dict, key, node: ast.expr) -> None:
        """Remember that `out[key]` was written as a bare name bound in this file."""
        if isinstance(node, ast.Name) and node.id in self.config.values:
            self.config.aliases[(id(out), key)] = node.id

    def merge(self, out: dict, value) -> None:
        if not isinstance(value, dict):
            raise _NotEvaluable
        out.update(value)

    def apply(self, op, left, right, node):
        if op is None or not (_known(left) and _known(right)):
            return Unknown(self.source(node)) if isinstance(node, ast.stmt) else self._raise()
        if op is operator.pow and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
            raise _NotEvaluable
        if op is operator.mul and any(isinstance(v, (str, list, tuple)) for v in (left, right)):
            count = right if isinstance(right, int) else left
            if not isinstance(count, int) or count > 10_000:
                raise _NotEvaluable
        try:
            return op(left, right)
        except (TypeError, ZeroDivisionError, OverflowError):
            if isinstance(node, ast.stmt):
                return Unknown(self.source(node))
            raise _NotEvaluable from None

    @staticmethod
    def _raise():
        raise _NotEvaluable


def read_py_config(path: str | Path) -> PyConfig:
    """Interpret `path` (see the module docstring); syntax errors are one ConfigError line."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"not valid Python: {exc.msg}", where=f"{path}:{exc.lineno}") from None
    reader = _Reader(text, str(path))
    reader.run(tree.body)
    return reader.config
