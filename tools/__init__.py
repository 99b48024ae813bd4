"""Command-line tools (benchmark, export, model statistics, run plots). Each runs as ``python tools/X.py``
or ``python -m tools.X`` from the repository root; as a file it imports ``tools/_root.py`` first."""
