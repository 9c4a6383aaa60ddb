"""The device catalogue: the built-in profiles, the user's files (``$EDGESEQ_DEVICES``, extra
paths) and this host's cached calibration, by id. Apart from ``profile`` (the format) and
``calibrate`` (measuring the host), which both sit below it."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable

from edgeseq.devices.calibrate import cached_host
from edgeseq.devices.profile import DATA_DIR, ENV_VAR, DeviceError, DeviceProfile


# -- loading ---------------------------------------------------------------------------------
def builtin_files() -> list[Path]:
    """The device files shipped with edgeseq."""
    return sorted(DATA_DIR.glob("*.toml"))


def _expand(paths: Iterable[Path]) -> tuple[list[Path], list[DeviceError]]:
    files, errors = [], []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            files += sorted(p.glob("*.toml"))
        elif p.is_file():
            files.append(p)
        else:
            errors.append(DeviceError("no such file or folder", p))
    return files, errors


def user_paths(extra: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """``$EDGESEQ_DEVICES`` (os.pathsep-separated) then ``extra``, in that order."""
    env = [Path(s) for s in os.environ.get(ENV_VAR, "").split(os.pathsep) if s.strip()]
    return env + [Path(p) for p in (extra or [])]


def load_profiles(extra: list[Path] | None = None) -> dict[str, DeviceProfile]:
    """Every known device by id: the built-in files, then ``$EDGESEQ_DEVICES``, then ``extra``
    (each a ``.toml`` file or a folder of them). A later file with the same id replaces an
    earlier one (so a user file can correct a built-in). The built-in ``host`` placeholder is
    replaced by this machine's cached calibration when one exists.

    Raises:
        DeviceError: every bad file, each named with its problems.
    """
    files, errors = _expand(user_paths(extra))
    out: dict[str, DeviceProfile] = {}
    for f in builtin_files() + files:
        try:
            prof = DeviceProfile.from_toml(f)
        except DeviceError as e:
            errors.append(e)
            continue
        out[prof.id] = prof
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise DeviceError("\n".join(str(e) for e in errors),
                          problems=[str(e) for e in errors])
    host = out.get("host")
    if host is not None and host.placeholder:
        out["host"] = cached_host() or host
    return out


def get_profile(name_or_path: str | os.PathLike,
                extra: list[Path] | None = None) -> DeviceProfile:
    """A device by id (``rpi5-8gb``) or by the path of its TOML file.

    Raises:
        DeviceError: an unknown id (the message lists the known ones) or a bad file.
    """
    s = str(name_or_path)
    if s.endswith(".toml") or os.sep in s or Path(s).is_file():
        return DeviceProfile.from_toml(s)
    profiles = load_profiles(extra)
    if s in profiles:
        return profiles[s]
    close = difflib.get_close_matches(s, list(profiles), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise DeviceError(f"unknown device {s!r}{hint} known: {', '.join(sorted(profiles))}")


