"""Verdicts a test program cannot forge: split an MBPP test, move values as plain data.

For a test whose last statement is ``assert CALL == EXPECTED`` (or ``!=``, either side the
literal), the sandbox only runs the program, the test's imports and setup, and ``CALL``; it
sends back the value of ``CALL`` as plain data, and the scorer compares it with
``EXPECTED``, which never enters the sandbox. ``assert CALL`` and ``assert not CALL`` send
back the truth value of ``CALL`` (the negation stays here). A value that is not plain data
fails: builtin scalars, ``str``, ``bytes``, their containers, subclasses of them that keep
the builtin's equality (``namedtuple``, ``defaultdict``, ``IntEnum``), and a few standard
library types whose equality with a builtin literal reduces to the builtin's (``Counter``,
``OrderedDict``, ``UserDict``/``UserList``/``UserString``, ``Fraction``, ``Decimal``).

The encoding runs inside the sandbox, so it proves nothing about the program; it does not
have to: whatever the program sends is only a value, and it never learns ``EXPECTED``.
"""
from __future__ import annotations

import ast
import collections
import decimal
import fractions
from dataclasses import dataclass

MAX_DEPTH = 100


class NotPlain(TypeError):
    """The value is not plain data (or too deep to move)."""


@dataclass(frozen=True)
class SplitTest:
    """``prefix`` runs after the program, then ``call`` is evaluated; the scorer applies
    ``kind`` (``eq``/``ne`` against ``expected``, or ``truth``/``falsy``)."""

    prefix: str
    call: str
    kind: str
    expected: object = None
    message: str = ""

    def job(self, code: str) -> dict:
        """What the sandbox gets: no expected value, no polarity."""
        reply = "truth" if self.kind in ("truth", "falsy") else "value"
        return {"code": code, "prefix": self.prefix, "call": self.call, "reply": reply}


# --------------------------------------------------------------------------- splitting
def _literal(node: ast.AST) -> tuple[bool, object]:
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _has(node: ast.AST, kinds: tuple[type, ...]) -> bool:
    return any(isinstance(child, kinds) for child in ast.walk(node))


def _operand(test: ast.expr) -> tuple[ast.expr, str, object] | None:
    """(CALL node, kind, expected) for the supported assert expressions."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.NotEq)):
        kind = "eq" if isinstance(test.ops[0], ast.Eq) else "ne"
        left, right = test.left, test.comparators[0]
        for call, other in ((left, right), (right, left)):
            is_literal, expected = _literal(other)
            if is_literal and not _has(call, (ast.Compare,)):
                return call, kind, expected
        return None
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return test.operand, "falsy", None
    return test, "truth", None


def split_test(test: str) -> SplitTest | None:
    """The split form of ``test`` (imports + setup + one final assert), or None when the
    test has another shape (it then runs whole, with the reference's semantics)."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not tree.body or not isinstance(tree.body[-1], ast.Assert):
        return None
    last, earlier = tree.body[-1], tree.body[:-1]
    if last.col_offset != 0 or any(_has(node, (ast.Assert,)) for node in earlier):
        return None
    if earlier and earlier[-1].end_lineno >= last.lineno:  # "x = 1; assert ..." on one line
        return None
    message = ""
    if last.msg is not None:
        is_literal, value = _literal(last.msg)
        if not is_literal:
            return None
        message = str(value)
    found = _operand(last.test)
    if found is None:
        return None
    call, kind, expected = found
    segment = ast.get_source_segment(test, call)
    if segment is None:
        return None
    prefix = "\n".join(test.splitlines()[: last.lineno - 1])
    return SplitTest(prefix, f"(\n{segment}\n)", kind, expected, message)


# --------------------------------------------------------------------------- encoding
_PLAIN_BASES = (bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)


def _plain_base(kind: type) -> type | None:
    """The builtin a subclass reduces to when it keeps that builtin's equality."""
    for base in kind.__mro__[1:]:
        if base in _PLAIN_BASES:
            return base if kind.__eq__ is base.__eq__ and kind.__ne__ is base.__ne__ else None
    return None


def _encode_items(items, depth: int) -> list:
    return [encode(item, depth + 1) for item in items]


def _encode_as(base: type, value, depth: int):
    if base is int:
        return {"i": hex(int.__int__(value))}
    if base is float:
        return {"f": float.hex(float.__float__(value))}
    if base is complex:
        return {"c": [float.hex(complex.__complex__(value).real), float.hex(complex.__complex__(value).imag)]}
    if base is str:
        return {"u": str.__str__(value)}
    if base is bytes:
        return {"b": bytes(memoryview(value)).hex()}
    if base is list:
        return {"l": _encode_items(list.__iter__(value), depth)}
    if base is tuple:
        return {"t": _encode_items(tuple.__iter__(value), depth)}
    if base is set:
        return {"s": _encode_items(set.__iter__(value), depth)}
    if base is frozenset:
        return {"z": _encode_items(frozenset.__iter__(value), depth)}
    if base is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    raise NotPlain(base.__name__)


def encode(value, depth: int = 0):
    """``value`` as JSON-able tagged data; raises NotPlain for anything else."""
    if depth > MAX_DEPTH:
        raise NotPlain("too deep")
    kind = type(value)
    if value is None or kind is bool:
        return value
    if kind in _PLAIN_BASES:
        return _encode_as(kind, value, depth)
    if kind is fractions.Fraction:
        return {"q": [hex(value.numerator), hex(value.denominator)]}
    if kind is decimal.Decimal:
        return {"D": decimal.Decimal.__str__(value)}
    if kind in (collections.Counter, collections.OrderedDict):
        return _encode_as(dict, value, depth)
    if kind in (collections.UserDict, collections.UserList, collections.UserString):
        return encode(value.data, depth + 1)
    base = _plain_base(kind)
    if base is None or base is bool:
        raise NotPlain(kind.__name__)
    return _encode_as(base, value, depth)


_SCALARS = {
    "i": lambda v: int(v, 16), "f": float.fromhex, "u": str, "b": bytes.fromhex,
    "c": lambda v: complex(float.fromhex(v[0]), float.fromhex(v[1])),
    "q": lambda v: fractions.Fraction(int(v[0], 16), int(v[1], 16)),
    "D": decimal.Decimal,
}
_CONTAINERS = {"l": list, "t": tuple, "s": set, "z": frozenset}


def decode(data, depth: int = 0):
    """The value ``encode`` described (raises on anything malformed: the sandbox wrote it)."""
    if depth > MAX_DEPTH:
        raise NotPlain("too deep")
    if data is None or type(data) is bool:
        return data
    if type(data) is not dict or len(data) != 1:
        raise NotPlain("malformed value")
    [(tag, payload)] = data.items()
    if tag in _SCALARS:
        if tag in ("c", "q"):
            if type(payload) is not list or len(payload) != 2 or not all(type(p) is str for p in payload):
                raise NotPlain("malformed value")
        elif type(payload) is not str:
            raise NotPlain("malformed value")
        return _SCALARS[tag](payload)
    if type(payload) is not list:
        raise NotPlain("malformed value")
    if tag in _CONTAINERS:
        return _CONTAINERS[tag](decode(item, depth + 1) for item in payload)
    if tag == "d":
        if not all(type(pair) is list and len(pair) == 2 for pair in payload):
            raise NotPlain("malformed value")
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in payload}
    raise NotPlain("malformed value")


def judge(split: SplitTest, reply: dict) -> dict:
    """The verdict for a split test from the sandbox's reply (``zygote`` statuses
    ``value``/``truth``; anything else is already a verdict)."""
    failed = {"status": "runtime_error", "error": f"AssertionError: {split.message}"}
    status = reply.get("status")
    if status == "truth":
        truth = reply.get("truth")
        if type(truth) is not bool:
            return failed
        return {"status": "success", "error": None} if truth == (split.kind == "truth") else failed
    if status in ("opaque", "success"):  # not plain data; a split test never "succeeds" by itself
        return failed
    if status != "value":
        return reply  # an error or a timeout: already a verdict
    try:
        value = decode(reply.get("value"))
        equal = value == split.expected
    except Exception:  # not plain data (or malformed): the comparison cannot be trusted
        return failed
    passed = equal if split.kind == "eq" else not equal
    return {"status": "success", "error": None} if passed else failed
