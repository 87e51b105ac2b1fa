"""What the book's exercise checks use, so that only a solution passes them.

Every chapter ends with exercises, each followed by a check cell that fails until the student
solves it (``tools/check_exercises.py`` runs them; ``tests/test_exercises.py`` also runs each
exercise's stored wrong answers and requires the check to reject every one). Two shortcuts past
a check are closed here:

* **Reading the answer off the check.** A check never computes its expected value in plain
  sight. A value answer (a count, a tuple, a rounded float) is compared with a digest of the
  right answer (:func:`assert_digest`); an array answer with a few stored numbers that
  fingerprint it (:func:`assert_fingerprint`).
* **Wrapping the reference.** A check that compares a function with a reference (the package's,
  Optax's, the chapter's own) first runs :func:`assert_own_work`: the answer may not reach the
  reference, by name, attribute, alias, closure, default argument, ``functools.partial`` or
  ``jax.jit``. ``softmax = jax.jit(jax.nn.softmax)``, ``average = average_states`` and a
  one-line wrapper of ``kv_cache_bytes`` all fail it; the check may then call the reference
  itself, since the answer cannot.

An instructor who changes an answer recomputes its digest, e.g.
``python -c "from gemma2_lite.exercises import digest; print(digest(42.0, sig=4))"``, and an
array's fingerprint with :func:`fingerprint`. Needs only numpy.
"""

from __future__ import annotations

import builtins
import dis
import functools
import hashlib
import inspect
import numbers
import types
from typing import Any

import numpy as np

SALT = "gemma2-lite exercise answer:"
FINGERPRINT_DIRECTIONS = 3


# ----------------------------------------------------------------------------- digests
def _number(x: float | numbers.Real, sig: int) -> str:
    text = format(float(x), f".{sig}g")
    return "0" if text in ("-0", "0") else text


def canonical(value: Any, sig: int | None = None) -> str:
    """A text that is equal for equal answers: bools, ints, strings, ``None``, sequences (list,
    tuple, array: all alike) and dicts (keys sorted) exactly; with ``sig``, every number
    (bools excepted) rounded to ``sig`` significant digits, so ``4096`` and ``4096.0`` agree.
    Without ``sig`` an int and a float differ (``3`` is not ``3.0``)."""
    if value is None or isinstance(value, (str, bytes)):
        return repr(value)
    if isinstance(value, (bool, np.bool_)):
        return f"b{bool(value)}"
    if hasattr(value, "shape") and hasattr(value, "tolist"):  # numpy or JAX array
        return canonical(np.asarray(value).tolist(), sig)
    if isinstance(value, numbers.Integral):
        return f"n{_number(value, sig)}" if sig else f"i{int(value)}"
    if isinstance(value, numbers.Real):
        return f"n{_number(value, sig)}" if sig else f"f{float(value)!r}"
    if isinstance(value, dict):
        items = sorted(f"{canonical(k, sig)}:{canonical(v, sig)}" for k, v in value.items())
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical(v, sig) for v in value) + "]"
    return f"?{type(value).__name__}"


def digest(value: Any, sig: int | None = None) -> str:
    """16 hex digits of SHA-256 of ``canonical(value, sig)``: what a check stores."""
    return hashlib.sha256((SALT + canonical(value, sig)).encode()).hexdigest()[:16]


def assert_digest(value: Any, expected: str, message: str, *, sig: int | None = None) -> None:
    """AssertionError(``message``) unless ``digest(value, sig) == expected``."""
    if digest(value, sig) != expected:
        raise AssertionError(message)


# ----------------------------------------------------------------------------- fingerprints
def fingerprint(x: Any, seed: int = 0) -> tuple[tuple[int, ...], list[float]]:
    """``(shape, [rms, p_1, p_2, p_3])`` of an array: its root mean square and its mean product
    with three fixed random arrays of its shape. Three numbers a wrong array cannot match by
    chance, and that do not give the array away."""
    a = np.asarray(x, np.float64)
    flat = a.ravel()
    dirs = np.random.default_rng(seed).standard_normal((FINGERPRINT_DIRECTIONS, flat.size))
    n = max(flat.size, 1)
    return a.shape, [float(np.sqrt(np.sum(flat * flat) / n)), *(dirs @ flat / n).tolist()]


def assert_fingerprint(
    x: Any, shape: tuple[int, ...], expected: list[float], message: str, *, tol: float = 1e-4
) -> None:
    """AssertionError(``message``) unless ``x`` has ``shape`` and its fingerprint is within
    ``tol`` times the expected root mean square (plus ``tol``) of ``expected``."""
    got_shape, got = fingerprint(x)
    if tuple(got_shape) != tuple(shape):
        raise AssertionError(f"{message} (shape {tuple(got_shape)}, want {tuple(shape)})")
    bound = tol * (abs(expected[0]) + 1.0)
    if not all(abs(g - e) <= bound for g, e in zip(got, expected)) or len(got) != len(expected):
        raise AssertionError(message)


# ----------------------------------------------------------------------------- own work
_BY_NAME = ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_NAME", "IMPORT_FROM", "LOAD_GLOBAL", "LOAD_NAME")


def _label(ref: Any) -> str:
    if isinstance(ref, str):
        return f"the name {ref!r}"
    if isinstance(ref, types.ModuleType):
        return f"the module {ref.__name__}"
    if inspect.ismethod(ref):
        return f"{type(ref.__self__).__name__}.{ref.__name__}"
    name = getattr(ref, "__qualname__", getattr(ref, "__name__", None))
    module = getattr(ref, "__module__", None) or ""
    if not name:
        return repr(ref)[:60]
    if module.startswith("__"):
        return f"{name} (the notebook's)"
    return f"{name} (from {module.split('.')[0]})" if module else name


def _is_users(fn: types.FunctionType) -> bool:
    """Defined in a notebook (``__main__``) or a namespace like ``__exercises__``."""
    module = fn.__globals__.get("__name__")
    return module is None or (module.startswith("__") and module.endswith("__"))


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


class _Search:
    """Does an answer reach any of the references? (see assert_own_work)"""

    def __init__(self, references: tuple[Any, ...]) -> None:
        self.objects = [r for r in references if not isinstance(r, str)]
        self.strings = {r for r in references if isinstance(r, str)}  # names, anywhere
        self.names: dict[str, Any] = {r: r for r in self.strings}
        self.pairs: list[tuple[Any, str, Any]] = []  # (owner, attribute, the method)
        for r in self.objects:
            if inspect.ismethod(r) and not isinstance(r.__self__, (type, types.ModuleType)):
                self.pairs.append((r.__self__, r.__name__, r))
            elif isinstance(r, types.ModuleType):
                self.names.setdefault(r.__name__.rsplit(".", 1)[-1], r)
            elif getattr(r, "__name__", None):
                self.names.setdefault(r.__name__, r)
        self.seen: set[int] = set()

    def same(self, obj: Any) -> Any:
        for r in self.objects:
            if obj is r:
                return r
            if (
                inspect.ismethod(r)
                and inspect.ismethod(obj)
                and obj.__self__ is r.__self__
                and obj.__func__ is r.__func__
            ):
                return r
        return None

    def search(self, obj: Any, depth: int = 0) -> Any:
        if depth > 40 or id(obj) in self.seen:
            return None
        self.seen.add(id(obj))
        hit = self.same(obj)
        if hit is not None:
            return hit
        inner: list[Any] = []
        if isinstance(obj, functools.partial):
            inner += [obj.func, *obj.args, *obj.keywords.values()]
        if inspect.ismethod(obj):
            inner.append(obj.__func__)
        wrapped = getattr(obj, "__wrapped__", None) if not isinstance(obj, type) else None
        if wrapped is not None:
            inner.append(wrapped)
        if isinstance(obj, (list, tuple)) and len(obj) <= 64:
            inner += list(obj)
        if isinstance(obj, types.FunctionType) and _is_users(obj):
            hit = self.code(obj, depth)
            if hit is not None:
                return hit
            inner += [c.cell_contents for c in obj.__closure__ or () if _has_contents(c)]
            inner += list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        for item in inner:
            hit = self.search(item, depth + 1)
            if hit is not None:
                return hit
        return None

    def code(self, fn: types.FunctionType, depth: int) -> Any:
        """What the function's bytecode names: globals it loads (followed), attributes and
        imports (matched by name, and resolved along module/class chains)."""
        scope = fn.__globals__
        for code in _codes(fn.__code__):
            current: Any = None  # the object the last load resolved to
            for ins in dis.get_instructions(code):
                name = ins.argval if isinstance(ins.argval, str) else None
                if name is not None and name in self.strings and ins.opname in _BY_NAME:
                    return name
                if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and name is not None:
                    if name in scope:
                        current = scope[name]
                        hit = self.search(current, depth + 1)
                        if hit is not None:
                            return hit
                        continue
                    current = None
                    if name in self.names and not hasattr(builtins, name):
                        return self.names[name]
                    continue
                if ins.opname in _BY_NAME and name is not None:
                    for owner, attr, method in self.pairs:
                        if current is owner and name == attr:
                            return method
                    if name in self.names:
                        return self.names[name]
                    if isinstance(current, (types.ModuleType, type)):
                        current = getattr(current, name, None)
                        hit = self.same(current) if current is not None else None
                        if hit is not None:
                            return hit
                    else:
                        current = None
                    continue
                current = None
        return None


def _has_contents(cell: Any) -> bool:
    try:
        _ = cell.cell_contents  # raises ValueError while the cell is empty
    except ValueError:
        return False
    return True


def assert_own_work(answer: Any, *references: Any, name: str | None = None) -> None:
    """AssertionError when ``answer`` (a function, or anything wrapping one) reaches one of
    ``references``: the very object (an alias, ``jax.jit(ref)``, ``functools.partial(ref)``),
    a global, closure variable or default argument holding it, an attribute or import of its
    name (``jax.nn.softmax``, ``from gemma2_lite.memory import kv_cache_bytes``), or, for a
    bound method such as ``TOK.decode``, that attribute of that object. Helper functions the
    notebook defines are followed; library code is not. A string reference forbids that
    attribute name; a module forbids every use of it.

    It reads what the answer's code names, so it stops plausible shortcuts, not a determined
    cheat (``getattr`` on a computed string goes unseen)."""
    hit = _Search(references).search(answer)
    if hit is not None:
        who = name or getattr(answer, "__name__", "the answer")
        raise AssertionError(
            f"{who} uses {_label(hit)}, the reference this check compares with: write it "
            "yourself (the exercise says what it may use)"
        )
