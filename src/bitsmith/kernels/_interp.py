"""Compatibility of Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) with NumPy >= 2.4.

The interpreter turns a scalar program value into a Python int with ``int(array)``, which NumPy
2.4 refuses for a 1-element 1-D array (``range(lo, hi)`` with a computed bound fails). Re-patching
``__index__`` with ``.item()`` is the whole fix; it only touches the interpreter's own patch
scope (undone after each launch) and is applied only when the interpreter is on.
"""
from __future__ import annotations

import os


def fix_interpreter_index() -> bool:
    """Apply the fix when ``TRITON_INTERPRET=1``; returns whether it was applied."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_bitsmith_fixed", False):
        return original is not None

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._bitsmith_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched
    return True
