"""A checkpoint's generation config: which fields exist, which edgeseq honours, which it refuses.

transformers' ``generate`` decodes with a ``GenerationConfig``: ``generation_config.json`` when
the checkpoint has one, else the generation fields of ``config.json``
(``GenerationConfig.from_model_config``, as the model's constructor does). Every field of it
is one of:

- honoured: the runtime applies it exactly as transformers 4.57 does (per task: its
  ``honoured_generation``, ``edgeseq/tasks/``);
- no effect on the tokens (``NO_EFFECT``: output format, caching, speculative-decoding knobs),
  or read by a family's own ``generate`` (the family's ``generation_own``: Whisper's prompt and
  timestamp rules, implemented by that family);
- refused: a checkpoint that sets any other field away from transformers' default is refused
  by ``check`` at convert time, naming the field, so a bundle never decodes differently from
  its checkpoint in silence.

The sampling warpers (``SAMPLING``) change nothing unless ``do_sample`` is set, as in
transformers. This module imports transformers only inside ``check`` (the runtime reads the
constants without it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeseq.bundle import BundleError

#: Fields the encoder-decoder runtime (``edgeseq.runtime.seq2seq``, ``processors``, ``beam``,
#: ``decoding``) applies identically to transformers; the manifest's ``config["generation"]``
#: captures them (``edgeseq.families.seq2seq``).
GENERATION_FIELDS = (
    "decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id",
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
    "bad_words_ids", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "repetition_penalty", "min_length", "min_new_tokens", "num_beams", "length_penalty",
    "early_stopping", "max_length", "max_new_tokens", "do_sample", "temperature", "top_k",
    "top_p", "renormalize_logits")

#: Sampling warpers: transformers applies them only when ``do_sample`` is set.
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
            "eta_cutoff")

#: Fields that do not change the tokens transformers' ``generate`` returns (the best sequence).
NO_EFFECT = frozenset({
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
    "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "use_cache", "cache_implementation", "cache_config",
    "return_legacy_cache", "prefill_chunk_size", "disable_compile", "compile_config",
    "low_memory",
    # speculative (assisted) decoding keeps greedy output unchanged
    "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "prompt_lookup_num_tokens", "max_matching_ngram_size",
    "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    # edgeseq returns the best hypothesis, which is transformers' first returned sequence
    "num_return_sequences",
})
NO_EFFECT_SPEECH = frozenset({"encoder_no_repeat_ngram_size"})

#: New tokens ``edgeseq run`` makes for a causal LM when not told (a causal checkpoint that
#: sets a length limit is refused, so it never competes with one).
CAUSAL_MAX_NEW_TOKENS = 64

#: transformers' own defaults of the fields the runtime reads (``GenerationConfig()``; a unit
#: test holds them equal), for manifests written before a field was captured.
DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None,
    "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "num_beams": 1,
    "length_penalty": 1.0, "early_stopping": False, "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "renormalize_logits": False,
}


def field(gen: dict[str, Any], name: str) -> Any:
    """``gen[name]``, or transformers' default when the manifest does not hold it."""
    v = gen.get(name)
    return DEFAULTS.get(name) if v is None else v


def default_max_new_tokens(gen: dict[str, Any], prompt_len: int) -> int:
    """New tokens transformers' ``generate`` makes when the caller sets no limit
    (``GenerationMixin._prepare_generated_length``): ``max_new_tokens``, else ``max_length``
    counted with the decoder prompt, except that the default ``max_length`` (20) means 20 new
    tokens."""
    if gen.get("max_new_tokens") is not None:
        return int(gen["max_new_tokens"])
    max_length = field(gen, "max_length")
    if max_length == DEFAULTS["max_length"]:
        return int(max_length)
    return max(0, int(max_length) - prompt_len)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check(model: Any, folder: Path, family: Any) -> None:
    """Refuse a checkpoint whose generation config sets a field edgeseq's runtime does not
    apply as transformers does. ``model``: the loaded transformers model (its
    ``generation_config`` is what ``generate`` would use); families without one (edgeseq's own
    models) are checked against ``generation_config.json`` if the folder has one. ``family``:
    the checkpoint's family (its task, and the fields its own ``generate`` reads, overrides or
    that edgeseq refuses: ``edgeseq.families.base.Family.generation_*``)."""
    from edgeseq.registry import tasks

    task = family.task
    kind = tasks().get(task)
    if kind is None or not kind.generates:
        return  # classifiers do not generate
    from transformers import GenerationConfig

    folder = Path(folder)
    if not folder.is_dir():  # a checkpoint given as its weights file
        folder = folder.parent
    path = folder / "generation_config.json"
    gen = getattr(model, "generation_config", None)
    if gen is None:
        if not path.is_file():
            return
        try:
            gen = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: not a readable generation config ({e})") from None
    label = path if path.is_file() else folder / "config.json"
    values = gen.to_dict()
    defaults = GenerationConfig().to_dict()
    honoured = kind.honoured_generation
    own = family.generation_own | family.generation_overridden
    no_effect = NO_EFFECT | (NO_EFFECT_SPEECH if kind.audio else frozenset())
    sampling = bool(values.get("do_sample"))
    # the fields transformers' generate reads; any other key (a model-config key copied by
    # from_model_config, an unknown one) is never read, and the family's own are its business
    for name in defaults:
        if name not in values or name in own or name in no_effect:
            continue
        value = values[name]
        if value == defaults.get(name) or (value in ([], {}) and defaults.get(name) is None):
            continue  # an empty token list bans or biases nothing
        if name in SAMPLING and not sampling:
            continue  # the warpers apply only when sampling
        if name not in honoured:
            raise BundleError(f"{label}: {name} = {_show(value)} is not supported by edgeseq's "
                              f"runtime ({task}); transformers' default is "
                              f"{_show(defaults.get(name))}, and decoding without it would "
                              f"differ from transformers' generate")
    for name in family.generation_unsupported:
        if values.get(name) not in (None, False):
            raise BundleError(f"{label}: {name} = {_show(values[name])} is not supported by "
                              f"edgeseq's runtime ({family.name}'s long-form fallback); decoding "
                              f"without it would differ from transformers' generate")
    beams = values.get("num_beams") or 1
    if sampling and beams > 1 and "do_sample" not in own:
        raise BundleError(f"{label}: do_sample = true with num_beams = {beams} (beam sampling) "
                          f"is not supported by edgeseq's runtime")
