"""Whisper's decoding conventions, as transformers' ``WhisperForConditionalGeneration.generate``
applies them, read from the bundle's manifest alone (the runtime has no transformers).

The decoder prompt (transformers' ``_retrieve_init_tokens``, 4.57):

1. ``<|startoftranscript|>`` (``decoder_start_token_id``).
2. Neither a language nor a task given: the generation config's ``forced_decoder_ids`` follow,
   positions 1, 2, ... in order (published multilingual checkpoints force ``[[1, null], [2,
   <|transcribe|>]]``: the language slot left open, then transcribe; ``.en`` checkpoints force
   ``<|notimestamps|>``). A language or task given: ``forced_decoder_ids`` are ignored.
3. The language: the one given, else — when the model has ``lang_to_id`` and the prompt has no
   language yet — the detected one (one decoder step from ``<|startoftranscript|>``, argmax over
   the language tokens), put in slot 1.
4. The task: the one given is appended; with a language given and no task in the prompt,
   ``<|transcribe|>``.
5. ``<|notimestamps|>`` appended unless timestamps are asked for (then removed if it is last).

English-only checkpoints (``is_multilingual: false``) refuse a language or a task, as transformers
does. What this module needs is stored at convert time in ``config["whisper"]``
(``edgeseq.families.whisper.whisper_config``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from edgeseq.bundle import BundleError

TASKS = ("transcribe", "translate")
AUTO = "auto"


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's Whisper conventions (``config["whisper"]``); empty for bundles converted
    before they were stored, which then decode from their stored ``decoder_prompt``."""
    return dict(config.get("whisper") or {})


def check_options(w: dict[str, Any], language: str | None, task: str | None) -> None:
    """A one-line ``BundleError`` for options this checkpoint cannot honour."""
    if not w:
        if (language not in (None, AUTO)) or task is not None:
            raise BundleError("--language/--task: this bundle stores no Whisper language/task "
                              "tokens (convert it again with this edgeseq)")
        return
    if w.get("is_multilingual") is False or not w.get("lang_to_id"):
        what = ("this is an English-only Whisper model" if w.get("is_multilingual") is False
                else "this Whisper model has no language or task tokens")
        if language not in (None, AUTO):
            raise BundleError(f"--language {language}: {what}; it takes no language")
        if task is not None:
            raise BundleError(f"--task {task}: {what}; it takes no task")
        return
    if task is not None and task not in TASKS:
        raise BundleError(f"--task {task}: unknown task; give one of {', '.join(TASKS)}")
    if task is not None and task not in (w.get("task_to_id") or {}):
        raise BundleError(f"--task {task}: this model's generation config has no "
                          f"<|{task}|> token")
    if language not in (None, AUTO):
        language_id(w, language)


def language_id(w: dict[str, Any], language: str) -> int:
    """Token id of a language given as a code (``fr``), a token (``<|fr|>``) or a name
    (``french``), as transformers accepts them."""
    lang = language.lower()
    table = w.get("lang_to_id") or {}
    names = w.get("language_names") or {}
    if lang in table:
        token = lang
    elif lang in names:
        token = f"<|{names[lang]}|>"
    else:
        token = f"<|{lang}|>"
    if token not in table:
        codes = sorted(t[2:-2] for t in table)
        raise BundleError(f"--language {language}: not a language of this model; give a code "
                          f"such as {', '.join(codes[:8])}, ... ({len(codes)} codes) or auto")
    return int(table[token])


def language_code(w: dict[str, Any], token_id: int) -> str:
    for tok, i in (w.get("lang_to_id") or {}).items():
        if int(i) == int(token_id):
            return tok[2:-2]
    raise ValueError(f"token {token_id} is not a language token of this model")


def needs_detection(w: dict[str, Any], language: str | None, task: str | None = None) -> bool:
    """True where transformers would detect the language: the model has ``lang_to_id`` and
    neither the language given nor the forced ids fill the language slot."""
    language = w.get("language") if language in (None, AUTO) else language
    if not w.get("lang_to_id") or language is not None:
        return False
    task = task if task is not None else w.get("task")
    init = _forced_prefix(w) if task is None else [w["decoder_start_token_id"]]
    return len(init) <= 1 or init[1] is None


def _forced_prefix(w: dict[str, Any]) -> list[int | None]:
    init: list[int | None] = [int(w["decoder_start_token_id"])]
    forced = [list(p) for p in (w.get("forced_decoder_ids") or [])]
    if forced and forced[0][0] == 1:
        i = 1
        while forced and forced[0][0] == i:
            init.append(forced[0][1])
            forced = forced[1:]
            i += 1
        if forced:
            raise BundleError(f"forced_decoder_ids {w.get('forced_decoder_ids')}: not Whisper's "
                              f"prompt pattern (an entry for every index from 1)")
    return init


def prompt(w: dict[str, Any], language: str | None = None, task: str | None = None,
           timestamps: bool = False, detected: str | None = None) -> list[int]:
    """The decoder prompt transformers' Whisper ``generate`` builds (``decoder_input_ids``).

    ``language``: a code, token or name given by the user (None or ``auto``: none given);
    ``detected``: the language code found by ``detect_language`` where ``needs_detection``.
    """
    check_options(w, language, task)
    if language == AUTO:
        language = None
    language = language if language is not None else w.get("language")
    task = task if task is not None else w.get("task")
    if task is None and language is None:
        init = _forced_prefix(w)
    else:
        init = [int(w["decoder_start_token_id"])]
    undefined = len(init) <= 1 or init[1] is None
    lang_id = None
    if language is not None:
        lang_id = language_id(w, language)
    elif w.get("lang_to_id") and undefined:
        if detected is None:
            raise ValueError("this multilingual model needs its language detected first "
                             "(edgeseq.runtime.whisper.detect_language)")
        lang_id = language_id(w, detected)
    if lang_id is not None:
        if len(init) > 1:
            init[1] = lang_id
        else:
            init.append(lang_id)
    task_ids = w.get("task_to_id") or {}
    if task is not None:
        init.append(int(task_ids[task]))
    elif language is not None and task_ids:
        if not any(t in init for t in task_ids.values()):
            init.append(int(task_ids["transcribe"]))
    nts = w.get("no_timestamps_token_id")
    if not timestamps and nts is not None and init[-1] != nts:
        init.append(int(nts))
    elif timestamps and nts is not None and init[-1] == nts:
        init = init[:-1]
    return [int(t) for t in init if t is not None]


def detect_language(session: Any, features: np.ndarray | None = None) -> str:
    """The language code transformers' ``detect_language`` picks: one decoder step from
    ``<|startoftranscript|>`` over ``features`` (mel bins, frames), every non-language logit
    masked, argmax. With ``features`` None the session's current encoding is used."""
    w = settings(session.config)
    if not w.get("lang_to_id"):
        raise BundleError("language detection: this Whisper model has no language tokens")
    if features is not None:
        session.encode(features)
    session.start(1)
    logits = np.asarray(session.step(np.array([int(w["decoder_start_token_id"])])))[0]
    ids = np.array(sorted(int(i) for i in w["lang_to_id"].values()))
    return language_code(w, int(ids[int(np.argmax(logits[ids]))]))


def default_timestamps(w: dict[str, Any]) -> bool:
    """The generation config's ``return_timestamps`` (false for published checkpoints)."""
    return bool(w.get("return_timestamps"))


def source_prompt(session: Any, features: np.ndarray, language: str | None = None,
                  task: str | None = None, timestamps: bool | None = None) -> list[int] | None:
    """The prompt for decoding ``features`` with these options, detecting the language on them
    where transformers would; None for a bundle without stored Whisper conventions (its stored
    ``decoder_prompt`` applies). Leaves ``features`` encoded in the session."""
    w = settings(session.config)
    if not w:
        check_options(w, language, task)
        return None
    ts = default_timestamps(w) if timestamps is None else timestamps
    detected = detect_language(session, features) if needs_detection(w, language, task) else None
    return prompt(w, language, task, ts, detected=detected)


def text(session: Any, ids: list[int]) -> str:
    """Transcript text as transformers' ``batch_decode(skip_special_tokens=True)`` gives it:
    special tokens dropped and timestamp tokens (added, not special, in the vocabulary) removed."""
    w = settings(session.config)
    nts = w.get("no_timestamps_token_id")
    keep = [int(i) for i in ids if nts is None or int(i) <= int(nts)]
    return session.decode(keep)
