"""nanochat's calculator tool, without ``eval`` and with a timeout that works in any thread.

nanochat (§5.6) accepts two kinds of expressions after stripping commas:
* arithmetic over ``0-9*+-/.() `` without ``**``;
* string expressions over letters, digits, quotes, ``()._`` and space that contain ``.count(`` and none of a
  list of dangerous words (``__``, ``import``, ``eval``, ``open`` ...).
It then ``eval``s them with empty builtins under a SIGALRM timeout — which only works in the main thread (Gradio
and data loaders call tools from worker threads). Here the same gate is kept, and the expression is parsed with
``ast`` and evaluated by a small interpreter that knows only numbers, strings, + - * / //, unary +/- and a few
pure string methods. Every operation is bounded by the expression's length, and a deadline is checked at every
node, so a runaway evaluation is impossible and the timeout needs no signals.
"""

from __future__ import annotations

import ast
import operator
import threading
import time

_MATH_CHARS = frozenset("0123456789*+-/.() ")
_STRING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
_DANGEROUS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input", "globals", "locals",
              "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
MAX_EXPR_CHARS = 10_000  # far above any useful calculation; bounds every intermediate result
MAX_DEPTH = 300  # nesting comes only from parentheses here, which Python's parser caps at 200
# Pathologically nested expressions ("-"*9999 + "1", 5000 parentheses) make CPython's parser give up with a
# MemoryError or SyntaxError, and on 3.11 occasionally with a SystemError when several threads parse at once (its
# AST recursion bookkeeping is shared): parsing takes milliseconds at MAX_EXPR_CHARS, so one parse at a time.
_PARSE_LOCK = threading.Lock()

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# pure, linear-time methods; "count" is the tool's purpose, the others normalise the string first
_STR_METHODS = {"count": 1, "lower": 0, "upper": 0, "casefold": 0, "strip": 0, "lstrip": 0, "rstrip": 0,
                "title": 0, "capitalize": 0, "swapcase": 0, "split": 0}


class _Refused(Exception):
    pass


def _gate(expr: str) -> bool:
    """nanochat's grammar: which (comma-stripped) expressions the calculator agrees to evaluate at all."""
    if all(c in _MATH_CHARS for c in expr):
        return "**" not in expr
    if not all(c in _STRING_CHARS for c in expr):
        return False
    lowered = expr.lower()
    return ".count(" in expr and not any(word in lowered for word in _DANGEROUS)


class _Evaluator:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def eval(self, node, depth: int = 0):
        if time.monotonic() > self.deadline:
            raise _Refused("timed out")
        if depth > MAX_DEPTH:
            raise _Refused("too deeply nested")
        method = getattr(self, "_" + type(node).__name__, None)
        if method is None:
            raise _Refused(f"{type(node).__name__} is not allowed")
        return method(node, depth + 1)

    def _Expression(self, node, depth):
        return self.eval(node.body, depth)

    def _Constant(self, node, depth):
        if type(node.value) not in (int, float, str, bytes):  # no bool/None/complex/Ellipsis
            raise _Refused(f"constant {node.value!r} is not allowed")
        return node.value

    def _JoinedStr(self, node, depth):  # f"abc" without placeholders is just a string
        if not all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in node.values):
            raise _Refused("f-string placeholders are not allowed")
        return "".join(v.value for v in node.values)

    def _Tuple(self, node, depth):
        return tuple(self.eval(e, depth) for e in node.elts)

    # Chains like "1+2+3+..." (left-nested BinOps) and "---5" (nested UnaryOps) are walked in a loop, not by
    # recursion, so a long sum is no deeper than a short one.
    def _UnaryOp(self, node, depth):
        ops = []
        while isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                self._refuse(node.op)
            ops.append(_UNARY[type(node.op)])
            node = node.operand
        value = self._number(self.eval(node, depth))
        for op in reversed(ops):
            value = op(value)
        return value

    def _BinOp(self, node, depth):
        chain = []
        while isinstance(node, ast.BinOp):
            if type(node.op) not in _BINOPS:
                self._refuse(node.op)
            chain.append((_BINOPS[type(node.op)], node.right))
            node = node.left
        value = self._number(self.eval(node, depth))
        for op, right in reversed(chain):
            value = op(value, self._number(self.eval(right, depth)))
        return value

    def _Call(self, node, depth):
        func = node.func
        if not isinstance(func, ast.Attribute) or func.attr not in _STR_METHODS or node.keywords:
            raise _Refused("only string methods like 'text'.count('x') may be called")
        receiver = self.eval(func.value, depth)
        args = [self.eval(a, depth) for a in node.args]
        if func.attr == "count":
            if len(args) != 1 or not isinstance(receiver, (str, bytes, list)):
                raise _Refused(".count takes one argument on a string")
        elif args or not isinstance(receiver, str):
            raise _Refused(f".{func.attr}() takes no argument and needs a string")
        return getattr(receiver, func.attr)(*args)

    @staticmethod
    def _number(value):
        if type(value) not in (int, float):
            raise _Refused("arithmetic only on numbers")
        return value

    @staticmethod
    def _refuse(op):
        raise _Refused(f"operator {type(op).__name__} is not allowed")


def use_calculator(expr: str, timeout: float = 3.0):
    """Evaluate a calculator expression as nanochat's tool does; returns the result, or None when refused,
    invalid (syntax, division by zero, ...) or slower than ``timeout`` seconds. Safe to call from any thread."""
    if not isinstance(expr, str):
        return None
    expr = expr.replace(",", "")  # "1,000" means 1000
    if len(expr) > MAX_EXPR_CHARS or not _gate(expr):
        return None
    deadline = time.monotonic() + timeout
    try:
        with _PARSE_LOCK:
            tree = ast.parse(expr.lstrip(" "), mode="eval")  # eval() ignores leading spaces, ast.parse does not
        result = _Evaluator(deadline).eval(tree)
        str(result)  # ints beyond Python's str() digit limit cannot be shown to the model
    except (_Refused, SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError,
            SystemError):  # SystemError: the parser's own limits on pathological nesting (see _PARSE_LOCK)
        return None
    return result
