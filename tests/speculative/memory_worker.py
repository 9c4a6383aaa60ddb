"""Child process for the memory test: load a bundle under a budget, generate, report peak RSS.

``python tests/speculative/memory_worker.py BUNDLE BACKEND SPECULATE BUDGET RUNS SEED``: prints
one JSON line. The baseline is taken after the backend's libraries are imported and before the
model is loaded (``edgeseq profile``'s definition); the peak is the process's high-water mark
(VmHWM), reset just before the baseline.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _host() -> dict:
    """What of the host can change a process's footprint."""
    import os

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return {"cpus": os.cpu_count(), "thp": thp.read_text().strip() if thp.is_file() else None}


def main(argv: list[str]) -> int:
    bundle, backend, speculate, budget_s, runs_s, seed_s = argv
    import numpy as np

    from edgeseq.quiet import quiet_third_party

    quiet_third_party()
    from edgeseq.bundle import BundleError, read_manifest
    from edgeseq.runtime.profile import _import_backend, _rss
    from edgeseq.runtime.speculative import load
    import edgeseq.runtime.seq2seq  # noqa: F401  (imported code is not the model's memory)
    import edgeseq.runtime.speculative.plan  # noqa: F401

    _import_backend(backend)
    man = read_manifest(bundle)
    rng = np.random.default_rng(int(seed_s))
    vocab = int(man.config["vocab_size"])
    seq2seq = man.task != "causal_lm"
    max_src, max_new = 24, 24
    # exercise the code paths once on a throwaway buffer so lazy imports happen before the baseline
    np.zeros(1).sum()
    hwm = Path("/proc/self/clear_refs")
    hwm.write_text("5")
    base = _rss()
    # the split of the growth (anonymous vs file-backed pages, e.g. library code touched for the
    # first time) goes into the report, to tell a plan's miss from a host's paging
    parts = ("RssAnon", "RssFile")
    base_parts = {k: _rss(k) for k in parts}
    budget = int(budget_s)
    out = {"budget": budget}
    try:
        ss = load(bundle, backend=backend, speculate=speculate, memory_budget=budget, threads=1,
                  max_source=max_src if seq2seq else None,
                  max_length=(1 + max_new) if seq2seq else None)
    except BundleError as e:
        out.update(refused=True, message=str(e), peak=_rss("VmHWM") - base)
        print(json.dumps(out))
        return 0
    out.update(refused=False, mode=ss.plan.mode, planned=ss.plan.total,
               k=ss.plan.k_max, width=ss.plan.width, rollback=ss.plan.rollback)
    for _ in range(int(runs_s)):
        if seq2seq:
            n = int(rng.integers(2, max_src))
            ids = np.append(rng.integers(8, min(vocab, 24), n - 1), man.config["eos_token_id"])
        else:
            ids = rng.integers(1, vocab, int(rng.integers(1, 200)))
        ss.generate(ids, int(rng.integers(1, max_new)),
                    do_sample=bool(rng.integers(0, 2)), seed=int(rng.integers(0, 1 << 30)))
    out.update(peak=_rss("VmHWM") - base, stats=ss.report()["speculation"],
               end={k: _rss(k) - v for k, v in base_parts.items()}, host=_host())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
