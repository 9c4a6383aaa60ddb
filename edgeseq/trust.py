"""Whether a bundle's files are the ones its manifest records: sizes checked at every load,
SHA-256 hashes on the first load on a machine (remembered in the trust record of
``edgeseq.paths.cache_root``), ``edgeseq inspect --verify``, and which bundles this machine
converted itself (the only ones a loader that unpickles may open)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from edgeseq.bundle import MANIFEST_FILE, Manifest, read_manifest
from edgeseq.errors import BundleError
from edgeseq.paths import cache_root

# -- integrity: hashes, and what this machine has converted or verified ---------------------------
TRUST_FILE = "verified-bundles.json"


#: bundles remembered as converted, and as verified, here (each list keeps its newest): a bundle
#: that falls out is hashed again on its next load, and (converted) loses --backend torch
MAX_TRUST_ENTRIES = 2048


def _trust_path() -> Path:
    return cache_root() / TRUST_FILE


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` for every file under ``root`` but the
    manifest: what convert records once the bundle is complete."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not p.is_symlink() and rel != MANIFEST_FILE:
            out[rel] = {"bytes": p.stat().st_size, "sha256": _file_sha256(p)}
    return out


def size_problems(root: Path, man: Manifest) -> list[str]:
    """Recorded files whose size differs from the record (after ``read_manifest``, which made
    sure each is a regular file inside the bundle): the cheap check every load makes."""
    problems = []
    for f, rec in (man.files or {}).items():
        size = os.stat(root / f).st_size
        if size != rec["bytes"]:
            problems.append(f"{root / f}: {size} bytes, the manifest records {rec['bytes']} "
                            f"(truncated or replaced)")
    return problems


def verify_bundle(root: str | os.PathLike) -> list[str]:
    """Every integrity problem of a bundle (empty: intact): the manifest's checks
    (``read_manifest``), then each recorded file's SHA-256 against the record, and files in the
    folder that the record does not list. For ``edgeseq inspect --verify``."""
    root = Path(root)
    try:
        man = read_manifest(root)
    except BundleError as e:
        return [str(e)]
    if man.files is None:
        return [f"{root / MANIFEST_FILE}: no files record (a bundle written before edgeseq "
                "recorded sizes and hashes): nothing to verify against; convert it again"]
    problems = size_problems(root, man)
    problems += [f"{root / f}: SHA-256 differs from the manifest's record (modified or replaced)"
                 for f, rec in man.files.items() if _file_sha256(root / f) != rec["sha256"]]
    extra = set(file_records_names(root)) - set(man.files)
    problems += [f"{root / f}: not in the manifest's files record" for f in sorted(extra)]
    return problems


def file_records_names(root: Path) -> list[str]:
    """Every entry under ``root`` that is not a folder (symlinks, FIFOs included), but the
    manifest."""
    return [rel for p in root.rglob("*")
            if (rel := p.relative_to(root).as_posix()) != MANIFEST_FILE
            and (p.is_symlink() or not p.is_dir())]


def _fingerprint(root: Path, man: Manifest) -> dict[str, Any]:
    st = {f: os.stat(root / f) for f in (man.files or {})}
    return {"manifest": man.read_sha256 or _file_sha256(root / MANIFEST_FILE),
            "files": {f: [s.st_size, s.st_mtime_ns] for f, s in st.items()}}


@contextmanager
def _trust_db() -> Iterator[dict[str, Any]]:
    """The record of bundles converted or verified here, read and rewritten under a lock (two
    processes loading at once must not drop each other's entries). Where the cache cannot be
    written (a read-only home) the record lives for the call only: bundles are hashed on every
    load, and --backend torch is refused."""
    path = _trust_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(f".{TRUST_FILE}.lock"), "w")
    except OSError:
        yield {"converted": {}, "verified": {}}
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            db = json.loads(path.read_text())
        except (OSError, ValueError):
            db = {}   # a missing or broken record only costs a re-hash
        db = {key: db[key] if isinstance(db, dict) and isinstance(db.get(key), dict) else {}
              for key in ("converted", "verified")}
        before = json.dumps(db, sort_keys=True)
        yield db
        for key in ("converted", "verified"):    # oldest first out: the record stays small
            for k in list(db[key])[:max(0, len(db[key]) - MAX_TRUST_ENTRIES)]:
                del db[key][k]
        if json.dumps(db, sort_keys=True) != before:
            tmp = path.with_name(f".{TRUST_FILE}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(db))
                tmp.replace(path)
            except OSError:
                tmp.unlink(missing_ok=True)


#: the partial folders this process is writing: its own conversion's parity loads them
WRITING: set[str] = set()


def record_converted(root: str | os.PathLike) -> None:
    """Remember a bundle this machine has just converted: its manifest's hash (so the bundle
    is recognised wherever it is moved) and its files' sizes and times (no re-hash on load)."""
    root = Path(root)
    man = read_manifest(root)
    fp = _fingerprint(root, man)
    with _trust_db() as db:
        db["converted"].pop(fp["manifest"], None)
        db["converted"][fp["manifest"]] = True
        db["verified"].pop(os.path.realpath(root), None)
        db["verified"][os.path.realpath(root)] = fp


def check_integrity(root: str | os.PathLike, man: Manifest) -> str:
    """At load, after ``read_manifest``: hash a bundle's files against its record the first
    time this machine sees it (a download), remember the result by path, sizes and modification
    times, and afterwards check those only. Returns how far the bundle is trusted: ``written``
    (this process is converting it), ``converted`` (this machine converted it, files intact),
    ``verified`` (its files match its own record) or ``unrecorded`` (an old bundle without a
    record: warned, accepted as is). Raises BundleError naming each modified file."""
    root = Path(root)
    if os.path.realpath(root) in WRITING:
        return "written"
    if man.files is None:
        warnings.warn(f"{root}: bundle has no files record (written before edgeseq recorded "
                      "sizes and hashes); its files are not verified: convert it again",
                      stacklevel=2)
        return "unrecorded"
    sizes = size_problems(root, man)
    if sizes:
        raise BundleError(f"{root / MANIFEST_FILE}: " + "; ".join(sizes))
    fp = _fingerprint(root, man)
    key = os.path.realpath(root)
    with _trust_db() as db:
        known = db["verified"].get(key) == fp
        converted = fp["manifest"] in db["converted"]
        if not known:
            bad = [f for f, rec in man.files.items() if _file_sha256(root / f) != rec["sha256"]]
            if bad:
                raise BundleError(f"{root / MANIFEST_FILE}: " + "; ".join(
                    f"{f}: SHA-256 differs from the manifest's record (modified or replaced)"
                    for f in bad))
            db["verified"].pop(key, None)
            db["verified"][key] = fp
    return "converted" if converted else "verified"


def trusted_to_unpickle(root: str | os.PathLike, man: Manifest) -> str | None:
    """None if ``root``'s files (``man``: its manifest, as read for this load) are what this
    machine's own convert wrote (safe to hand to a loader that unpickles), else why not."""
    root = Path(root)
    if os.path.realpath(root) in WRITING:
        return None
    if man.files is None:
        return "it has no files record (a bundle from an older edgeseq)"
    if check_integrity(root, man) != "converted":
        return "it was not converted on this machine"
    return None


def sha256_of(paths: Sequence[Path]) -> str:
    """Hash of the given files (sorted by name), streamed so large checkpoints stay cheap."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()

