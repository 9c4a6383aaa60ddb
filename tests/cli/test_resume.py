"""A stream paused with state_dict() and resumed in a new process yields the same tokens."""
import json
import subprocess
import sys
import textwrap

import pytest

from ..conftest import FAMILIES

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from safetensors.numpy import load_file, save_file
    import edgeseq
    bundle, backend, mode, path = sys.argv[1:5]
    kw = dict(do_sample=True, temperature=0.9, top_p=0.95, stop_at_eos=False)
    s = edgeseq.load(bundle, backend=backend)
    if mode == "unbroken":
        print(json.dumps(s.generate([3, 1, 4, 1, 5], 40, seed=9, **kw).tolist()))
    elif mode == "first":
        it = s.stream([3, 1, 4, 1, 5], 40, seed=9, **kw)
        toks = [int(next(it)[0]) for _ in range(17)]
        save_file(s.state_dict(), path)
        print(json.dumps(toks))
    else:
        s.load_state(load_file(path))
        print(json.dumps(s.generate(None, 23, **kw)[0].tolist()))
""")


def _run(*args):
    p = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["ort", "executorch"])
def test_resume_in_new_process(bundle_of, tmp_path, family, backend):
    root = bundle_of(family)
    unbroken = _run(root, backend, "unbroken", "-")
    state = tmp_path / "stream.safetensors"
    first = _run(root, backend, "first", state)
    rest = _run(root, backend, "rest", state)
    assert first + rest == unbroken
