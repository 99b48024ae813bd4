"""``python -m visualize --cfg CFG --image IMG [--checkpoint CKPT] [--stage S --block B] ...`` (see cli.py)."""
import sys

import errors


def _main() -> int:
    from .cli import main      # imports the model library: a configuration error there is reported too
    return main()


sys.exit(errors.cli(_main))
