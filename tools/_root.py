"""The one place a tool edits ``sys.path``: ``python tools/X.py`` puts tools/ first on the path, not the
repository root its imports (``errors``, ``models``, ``tools.bench``) live in; ``python -m tools.X`` needs
nothing of this."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
