"""Every family and backend is exercised by the shared suites (optimum's test_all_models_tested),
and every backend is one folder that provides the whole interface (#24)."""
from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from edgeseq.registry import backends, families
from edgeseq.runtime.backends.base import Backend, RuntimeMemory

from .conftest import CLASSIFIERS, FAMILIES, SEQ2SEQ

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "runtime" / "backends"
#: where backend folders live: the shipped ones, and the example of docs/architecture.md
BACKEND_ROOTS = (SHIPPED, REPO / "tests" / "backends")
#: the shared suites every backend runs through (exact parity, or the accelerators' gate:
#: ``Backend.exact``), and one parametrized test of each
SUITES = {"tests/backends/test_backends.py": "test_greedy_64_identical_and_last_logits",
          "tests/backends/test_accelerators.py": "test_gate_on_the_accelerator"}


def test_registries_are_covered():
    assert set(FAMILIES) | set(SEQ2SEQ) | set(CLASSIFIERS) == set(families())
    assert set(CLASSIFIERS) == {"lmuformer"}
    assert set(FAMILIES) >= {"mamba", "mamba2", "s4d"}
    assert set(SEQ2SEQ) >= {"t5", "bart", "marian", "whisper"}


def _folder(cls: type) -> Path:
    return Path(inspect.getfile(cls)).resolve().parent


def backend_folders() -> list[Path]:
    """The backend folders on disk: a package folder under a backend root."""
    return sorted(p.parent.resolve() for root in BACKEND_ROOTS for p in root.glob("*/__init__.py"))


def test_every_backend_folder_is_registered_and_every_backend_is_a_folder():
    homes = {_folder(cls): name for name, cls in backends().items()}
    unregistered = [str(f.relative_to(REPO)) for f in backend_folders() if f not in homes]
    assert unregistered == [], ("backend folders whose class is not registered (a line in "
                                "edgeseq/registry.py: _BACKEND_MODULES)", unregistered)
    for name, cls in backends().items():
        # the class in its folder's __init__.py, not a module beside other backends'
        assert Path(inspect.getfile(cls)).name == "__init__.py", name
        assert _folder(cls).parent in {r.resolve() for r in BACKEND_ROOTS}, name
    assert {n for n, c in backends().items() if _folder(c).parent == SHIPPED.resolve()} == \
        {"ort", "executorch", "openvino", "torch", "qnn"}


def test_every_backend_provides_the_whole_interface():
    """Each part is implemented in the backend's own class, or declared absent: no schemes
    (then no quantize method), no operator profiler (None)."""
    for name, cls in backends().items():
        assert issubclass(cls, Backend), name
        own = vars(cls)
        assert isinstance(own.get("format"), str) and own["format"] != "?", name
        assert isinstance(own.get("aliases"), tuple), name
        assert isinstance(own.get("memory"), RuntimeMemory), f"{name}: declare its memory"
        for method in ("lower", "load"):
            assert method in own, f"{name} does not implement {method}"
        quantizers = [m for m in ("quantize_graphs", "quantize_files") if m in own]
        schemes = cls.quant_schemes
        assert bool(schemes) == bool(quantizers), (name, schemes, quantizers)
        assert len(quantizers) <= 1, (name, quantizers)
        profiler = cls().ops_profiler()
        if profiler is not None:
            assert isinstance(profiler.SOURCE, str) and profiler.SOURCE, name
            assert callable(profiler.profiling) and callable(profiler.collect), name
            assert Path(profiler.__file__).resolve().parent == _folder(cls), \
                f"{name}: its operator profiler lives outside its folder"


def test_no_module_outside_a_backend_folder_reaches_into_its_privates():
    """Callers use a backend's class or its modules' public names (tests may reach in)."""
    folders = {f: ".".join(("edgeseq", *f.relative_to(REPO).parts)) for f in backend_folders()
               if f.parent == SHIPPED.resolve()}
    found = []
    for top in ("edgeseq", "convert", "runtime", "quant", "benchmarks"):
        for path in (REPO / top).rglob("*.py"):
            inside = next((f for f in folders if f in path.resolve().parents), None)
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or not node.module:
                    continue
                owner = next((f for f, mod in folders.items()
                              if node.module == mod or node.module.startswith(mod + ".")), None)
                if owner is not None and owner != inside and any(
                        a.name.startswith("_") for a in node.names):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == [], found


def test_every_backend_runs_through_the_shared_suite():
    """The suite's collected test ids name every registered backend (a backend the suite's
    parametrization left out would pass everything by never running)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                          "-p", "no:cacheprovider", *SUITES], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ran = {}
    for suite, test in SUITES.items():
        ids = [ln for ln in out.stdout.splitlines() if f"{suite}::{test}[" in ln]
        ran[suite] = {ln.rsplit("-", 1)[1].rstrip("]") for ln in ids}
    exact, gated = ran.values()
    assert exact | gated == set(backends()), (ran, sorted(backends()))
    assert exact == {n for n, c in backends().items() if c.exact}, ran


def test_every_family_can_make_a_test_checkpoint(checkpoints):
    for name in FAMILIES:
        assert (checkpoints[name] / "config.json").is_file()
