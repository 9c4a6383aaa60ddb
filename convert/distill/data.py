"""What a distillation run trains on: the user's ``--data``, or built-in prompts of the task.

``--data`` is read by the task's input kind (``Task.cli_input``), through the safe readers of
``edgeseq/limits.py`` and ``edgeseq/audio.py``:

- ``text`` (causal LMs, text encoder-decoders): UTF-8 text, one example per line;
- ``audio`` (speech): one WAV path per line (relative paths from the list's folder);
- ``frames`` (sequence classifiers): an ``.npy`` array (examples, frames, features).

Data of another kind than the teacher's task (a WAV or ``.npy`` given to a text model, text
lines that are not WAV paths for a speech model) is a one-line error naming the file.
Without ``--data`` the recipe continues ``PROMPTS`` with the teacher's own generations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseq.errors import BundleError

#: Built-in prompts for text tasks without ``--data``: English prose and Python code, the two
#: kinds of text the zoo's teachers and most small published models read. The teacher continues
#: each (sampled and greedy), so the student learns the teacher's own distribution.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea,",
    "The results of the experiment show that",
    "In this section we describe how the model is trained.",
    "Please find attached the report you asked for.",
    "The weather today is sunny with a light breeze",
    "def main():\n    ",
    "import os\nimport sys\n\n",
    "class Config:\n    \"\"\"",
    "    for i in range(len(items)):\n        ",
    "    if x is None:\n        return ",
    "# Copyright the authors. All rights reserved.\n",
    "    def __init__(self, name, value=None):\n        self.",
    "    return sorted(result, key=lambda item: item[1])\n",
    "The committee will meet again next week to discuss",
    "To install the package, run the following command:",
    "Error: the file could not be opened because",
    "    try:\n        data = json.loads(text)\n    except ValueError:\n        ",
    "Thank you for your message. I will reply as soon as",
    "The train leaves the station at nine o'clock and",
    "    \"\"\"Return the number of elements in the list.\"\"\"\n",
    "with open(path) as f:\n    for line in f:\n        ",
    "A good teacher explains the same idea in several ways",
    "The history of the city goes back to the twelfth century,",
)

_WAV_MAGIC = b"RIFF"
_NPY_MAGIC = b"\x93NUMPY"


def read_data(path: str | Path, kind: str, teacher: str) -> list[Any]:
    """The examples of ``--data`` for a teacher whose task reads ``kind`` inputs: text lines,
    audio arrays (16 kHz float32) or ``.npy`` sequences (frames, features)."""
    from edgeseq import limits

    p = Path(path)
    try:
        head = _head(p)
        if kind == "frames":
            if not head.startswith(_NPY_MAGIC):
                raise BundleError(f"{p}: {teacher} classifies sequences; --data must be an .npy "
                                  f"array (examples, frames, features)")
            a = limits.read_npy(p)
            if a.ndim != 3 or not len(a):
                raise BundleError(f"{p}: expected an .npy array (examples, frames, features), "
                                  f"got shape {a.shape}")
            return [x.astype("float32") for x in a]
        if head.startswith((_WAV_MAGIC, _NPY_MAGIC)):
            what = "a WAV file" if head.startswith(_WAV_MAGIC) else "an .npy array"
            need = "a list of WAV paths, one per line" if kind == "audio" else \
                "UTF-8 text, one example per line"
            raise BundleError(f"{p}: {what}; {teacher} reads {kind}, so --data must be {need}")
        lines = [ln for ln in limits.read_text_file(p, "--data").splitlines() if ln.strip()]
    except limits.LimitError as e:
        raise BundleError(str(e)) from None
    if not lines:
        raise BundleError(f"{p}: no examples (empty or blank lines only)")
    if kind == "text":
        return lines
    if kind == "audio":
        return [_read_audio(p, i, ln.strip()) for i, ln in enumerate(lines, 1)]
    raise BundleError(f"{p}: {teacher}'s task reads {kind!r} inputs, which distillation does "
                      f"not read")


def _head(p: Path) -> bytes:
    from edgeseq import limits

    limits.check_file(p, "--data", "input_bytes" if p.suffix != ".npy" else "npy_bytes")
    with open(p, "rb") as f:
        return f.read(8)


def _read_audio(listing: Path, line: int, name: str) -> Any:
    from edgeseq.audio import AudioError, read_wav

    wav = Path(name)
    if not wav.is_absolute():
        wav = listing.parent / wav
    if not wav.is_file():
        raise BundleError(f"{listing}:{line}: {name!r} is not a WAV file (a speech teacher's "
                          f"--data lists WAV paths, one per line)")
    try:
        return read_wav(wav)
    except (AudioError, ValueError, OSError) as e:
        raise BundleError(f"{listing}:{line}: {e}") from None
