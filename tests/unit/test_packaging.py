"""The stage folders install into one `edgeseq` namespace, importable from any folder."""
import subprocess
import sys


def test_namespace_imports_from_any_folder(tmp_path):
    code = ("import edgeseq, edgeseq.convert.pipeline, edgeseq.runtime.session, "
            "edgeseq.runtime.backends.onnxruntime, edgeseq.quant, edgeseq.kernels, "
            "edgeseq.devices; print(edgeseq.__version__)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "0.1.0"


def test_console_script(tmp_path):
    import shutil

    exe = shutil.which("edgeseq") or str(__import__("pathlib").Path(sys.executable).parent / "edgeseq")
    p = subprocess.run([exe, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "convert" in p.stdout and "run" in p.stdout and "zoo" in p.stdout


def test_console_script_exit_codes_and_output_survive_the_fast_exit(tmp_path):
    """``edgeseq.cli.entry`` leaves with ``os._exit``: the exit code and everything printed
    (to pipes, which buffer) must still come out."""
    import json
    import shutil

    exe = shutil.which("edgeseq") or str(__import__("pathlib").Path(sys.executable).parent / "edgeseq")
    bad = subprocess.run([exe, "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "missing" in bad.stderr
    usage = subprocess.run([exe, "convert"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Usage" in usage.stderr
    devices = subprocess.run([exe, "devices", "--json"], capture_output=True, text=True)
    assert devices.returncode == 0, devices.stderr
    assert len(json.loads(devices.stdout)) > 3     # a long output, flushed whole


def test_every_package_folder_is_installed():
    """A wheel holds only the packages pyproject lists (the editable install finds the rest by
    path, so a missing entry shows only once installed for real)."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        for init in (repo / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(repo / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found - listed == set(), "pyproject.toml [tool.setuptools] packages misses these"
