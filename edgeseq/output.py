"""Writing a bundle: into a temporary folder beside the destination, renamed into place only
when complete, under a lock on the destination, with the permissions the umask gives."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgeseq.errors import BundleError
from edgeseq.trust import WRITING

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(root: Path) -> None:
    """What a folder made by ``mkdir`` and files made by ``open`` would have under the umask
    (0755/0644 under 022): ``mkdtemp`` makes the folder 0700, so a shared bundle was unreadable
    to everyone else."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask, follow_symlinks=False)
        for f in filenames:
            path = os.path.join(dirpath, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails if ``dst`` exists (plain rename replaces an empty folder that
    appeared meanwhile): Linux's renameat2(RENAME_NOREPLACE), else check then rename."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):   # filesystems without the flag fall back
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    src.rename(dst)


@contextmanager
def _dest_lock(dest: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``.<name>.lock`` beside ``dest``, removed on release.
    A waiter that locked a lock file since removed (its holder finished between the open and
    the lock) tries again on the file now at the path."""
    path = dest.with_name(f".{dest.name}.lock")
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BundleError(f"{dest}: another edgeseq convert is writing {dest} (lock "
                              f"{path}); wait for it to finish") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        # unlinked before unlocking: a waiter holding the old file then sees it is gone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def stale_partials(dest: Path) -> list[Path]:
    """``.<name>.XXXXXXXX.partial`` folders beside ``dest`` (what ``atomic_folder`` makes; a
    killed convert leaves one) and a leftover ``.<name>.old``. Only a holder of ``dest``'s lock
    may remove them: every writer of such a folder holds that lock while it lives."""
    import re

    pat = re.compile(rf"\.{re.escape(dest.name)}\.[A-Za-z0-9_]{{8}}\.partial")
    if not dest.parent.is_dir():
        return []
    return [p for p in dest.parent.iterdir()
            if pat.fullmatch(p.name) or p.name == f".{dest.name}.old"]


@contextmanager
def atomic_folder(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; rename it to ``dest`` only if the body succeeds.

    A failed conversion therefore leaves no half-written bundle behind. The destination is
    locked for the whole write (a second writer fails at once), partial folders of killed
    writers are removed, the destination is checked again before the rename (without
    ``overwrite`` a folder that appeared meanwhile is never replaced), and the bundle gets the
    permissions the umask gives.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest}: already exists (use --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _dest_lock(dest):
        for old in stale_partials(dest):
            shutil.rmtree(old, ignore_errors=True)
        if dest.exists() and not overwrite:
            raise BundleError(f"{dest}: already exists (use --overwrite to replace it)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        key = os.path.realpath(tmp)
        WRITING.add(key)
        try:
            yield tmp
            WRITING.discard(key)
            _normal_permissions(tmp)
            if overwrite and os.path.lexists(dest):
                old = dest.with_name(f".{dest.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                dest.rename(old)
                _rename_noreplace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    _rename_noreplace(tmp, dest)
                except FileExistsError:
                    raise BundleError(f"{dest}: appeared while converting; not replaced (use "
                                      f"--overwrite to replace it)") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            WRITING.discard(key)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")

