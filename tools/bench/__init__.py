"""The benchmark behind ``tools/benchmark.py``, one module per mode: ``classify`` (the default: inference and
training step, ``--check``), ``sweep`` (``--sweep-resolution``), ``pipeline`` (``--data``), ``op`` (``--op``),
``dense`` (``--dense``); ``official`` runs ``--reference``'s official model in a subprocess; ``timing`` holds
the one timing helper and the measures, ``configs`` what ``--cfgs`` names, ``environment`` the device's peak
and the run's environment, ``cli`` the command line."""
