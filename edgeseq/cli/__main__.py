"""``python -m edgeseq.cli``."""
from edgeseq.cli import entry

entry()
