"""``python -m edgeseq.runtime.profile --worker ...``: the measurement's child process."""
import sys

from edgeseq.runtime.profile import main

sys.exit(main())
