"""Safe output: ``atomic_folder`` locks the destination, never replaces a folder that appeared
meanwhile, cleans what killed writers left, and gives the bundle the umask's permissions."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from edgeseq.bundle import BundleError
from edgeseq.output import atomic_folder


def _leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_a_second_writer_fails_at_once(tmp_path):
    dest = tmp_path / "out"
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("first")
        t = time.perf_counter()
        with pytest.raises(BundleError) as e:
            with atomic_folder(dest):
                pass
        assert time.perf_counter() - t < 1
        assert f"another edgeseq convert is writing {dest}" in str(e.value)
    assert (dest / "a").read_text() == "first"
    assert _leftovers(tmp_path, "out") == []    # lock file and partial folder gone


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgeseq.bundle import BundleError
    from edgeseq.output import atomic_folder
    try:
        with atomic_folder(sys.argv[1]) as tmp:
            (tmp / "who").write_text(sys.argv[2])
            print("WRITING", tmp, flush=True)
            time.sleep(float(sys.argv[3]))
    except BundleError as e:
        print("REFUSED", e, flush=True)
        raise SystemExit(3)
    print("DONE", flush=True)
""")


def _writer(dest, who, sleep):
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(dest), who, str(sleep)],
                            stdout=subprocess.PIPE, text=True)


def test_two_processes_converting_to_one_folder(tmp_path):
    dest = tmp_path / "out"
    first = _writer(dest, "first", 3)
    assert first.stdout.readline().startswith("WRITING")
    second = _writer(dest, "second", 0)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 3 and "another edgeseq convert is writing" in out
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert (dest / "who").read_text() == "first"
    # and a third, after, is told the folder exists (no --overwrite): nothing replaced
    with pytest.raises(BundleError, match="already exists"):
        with atomic_folder(dest):
            pass
    assert (dest / "who").read_text() == "first"


def test_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(BundleError, match="appeared while converting"):
        with atomic_folder(dest) as tmp:
            (tmp / "mine").write_text("x")
            dest.mkdir()                      # someone else's (empty) folder
            (dest / "theirs").write_text("y")
    assert sorted(p.name for p in dest.iterdir()) == ["theirs"]
    assert _leftovers(tmp_path, "out") == []
    with pytest.raises(BundleError, match="appeared while converting"):   # even empty
        with atomic_folder(tmp_path / "out2") as tmp:
            (tmp_path / "out2").mkdir()
    assert list((tmp_path / "out2").iterdir()) == []


def test_overwrite_replaces(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("o")
    with atomic_folder(dest, overwrite=True) as tmp:
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert _leftovers(tmp_path, "out") == []


def test_stale_partials_are_removed_and_others_kept(tmp_path):
    dest = tmp_path / "out"
    stale = [tmp_path / ".out.abcd1234.partial", tmp_path / ".out.zz_Y9xq0.partial",
             tmp_path / ".out.old"]
    keep = [tmp_path / ".out.b.abcd1234.partial",    # another destination's ("out.b")
            tmp_path / ".outx.abcd1234.partial", tmp_path / "out.partial"]
    for p in stale + keep:
        p.mkdir()
        (p / "f").write_text("x")
    with atomic_folder(dest) as tmp:
        (tmp / "a").write_text("a")
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


def test_sigkill_leaves_only_what_the_next_convert_cleans(tmp_path):
    dest = tmp_path / "out"
    w = _writer(dest, "killed", 60)
    line = w.stdout.readline()
    assert line.startswith("WRITING")
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)
    left = _leftovers(tmp_path, "out")
    assert any(n.endswith(".partial") for n in left)   # what a kill leaves
    with atomic_folder(dest) as tmp:                   # the lock died with its holder
        (tmp / "who").write_text("next")
    assert _leftovers(tmp_path, "out") == []
    assert (dest / "who").read_text() == "next"


def test_bundle_permissions_follow_the_umask(tmp_path):
    dest = tmp_path / "out"
    old = os.umask(0o022)
    try:
        with atomic_folder(dest) as tmp:
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "f").write_text("x")
            fd = os.open(tmp / "private", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(dest) == 0o755 and mode(dest / "sub") == 0o755
    assert mode(dest / "private") == 0o644 and mode(dest / "sub" / "f") == 0o644
    old = os.umask(0o077)
    try:
        with atomic_folder(tmp_path / "strict") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "strict") == 0o700 and mode(tmp_path / "strict" / "f") == 0o600


def test_a_failed_body_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_two_cli_converts_to_one_folder(tmp_path):
    """The race as users meet it: a second ``edgeseq convert`` to a folder being written fails
    at once with one line; the first finishes, and its bundle verifies."""
    from edgeseq.trust import verify_bundle

    def convert():
        return subprocess.Popen([sys.executable, "-c", "from edgeseq.cli import main; main()",
                                 "convert", "zoo:lmuformer-digits", "-o", str(dest),
                                 "--format", "onnx", "--skip-parity"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    dest = tmp_path / "out"
    first = convert()
    lock = tmp_path / ".out.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    second = convert()
    _, err = second.communicate(timeout=120)
    still_writing = first.poll() is None
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert still_writing, "the first convert ended before the second was refused"
    assert second.returncode != 0
    # progress lines, then the error: one line, the last
    lines = err.strip().splitlines()
    assert "Traceback" not in err and sum("error" in ln for ln in lines) == 1, err
    assert lines[-1].startswith("edgeseq: error: ") and \
        f"another edgeseq convert is writing {dest}" in lines[-1], err
    verify_bundle(dest)
    assert _leftovers(tmp_path, "out") == []
