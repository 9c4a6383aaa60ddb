"""Streaming memory does not grow with the stream's length."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import edgeseq

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    s = edgeseq.load(sys.argv[1], backend=sys.argv[2])
    it = s.stream(np.arange(1, 33), 20_000, stop_at_eos=False)
    for i, _ in enumerate(it, 1):
        if i == 1_000:
            at_1k = hwm()
    print(at_1k, hwm(), s.position)
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_peak_rss_flat_over_20k_tokens(bundle_of, backend):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(bundle_of("mamba")), backend],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    at_1k, at_20k, position = map(int, p.stdout.split()[-3:])
    assert position >= 20_000 + 31
    assert at_20k <= 1.05 * at_1k, (at_1k, at_20k)
