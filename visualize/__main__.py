"""``python -m visualize --cfg CFG --image IMG [--checkpoint CKPT] [--stage S --block B] ...`` (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
