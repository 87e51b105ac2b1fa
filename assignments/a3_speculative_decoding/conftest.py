"""Gives the tests their one argument, ``impl``: what the notebook next to them defines in its
imports cell and its *Your answer* cells (see ../grading.py). ASSIGNMENT_NOTEBOOK=path grades
another notebook."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from grading import impl  # noqa: E402,F401  (a pytest fixture)
