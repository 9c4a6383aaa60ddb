"""What every model family provides to the converter (one file per family registers one).

A family knows how to load a checkpoint folder into a *reference* PyTorch module (the model the
user trained, run exactly as its library runs it), and how to build *streaming graphs* from it:
pure modules whose recurrent or cached quantities are explicit inputs and outputs.

Causal-LM graph contract (state-space families):

- ``prefill``: ``input_ids`` (batch, chunk) int64 + ``state_in.*`` ->
  ``logits`` (batch, chunk, vocab) float32 + ``state_out.*``
- ``step``:    ``input_ids`` (batch,) int64 + ``state_in.*`` ->
  ``logits`` (batch, vocab) float32 + ``state_out.*``
- ``verify`` (optional; speculative decoding): as ``prefill`` over a short chunk, plus
  ``trace.<state name>`` (batch, chunk, *state dims): the state after every position (for a
  convolution window, the whole window: ``StateSpec.from_trace``), so a verifier rolls back to
  any accepted prefix without replaying it. Families without it verify
  with ``prefill`` and replay from a snapshot.
- ``exit_step`` (optional, ``edgeseq convert --early-exit N``): ``step`` through the first N
  layers and the head, over the first N layers' state (a prefix of the state list): the
  self-speculative drafter (Kangaroo).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeseq.bundle import BundleError, StateSpec, StreamingGraph, TensorSpec


class Family:
    """Base class; subclasses register with ``@register_family("name")``."""

    name: str = "?"
    task: str = "causal_lm"
    #: ``model_type`` values of ``config.json`` that this family loads.
    model_types: tuple[str, ...] = ()
    #: Generation-config fields this family's own ``generate`` reads and edgeseq implements for
    #: it (``edgeseq.generation.check`` leaves them to the family).
    generation_own: frozenset[str] = frozenset()
    #: Fields its ``generate`` overrides, so a checkpoint's values never take effect: left out
    #: of the manifest's generation record, so the runtime never applies them either.
    generation_overridden: frozenset[str] = frozenset()
    #: Fields its ``generate`` reads that edgeseq does not implement: refused when set.
    generation_unsupported: tuple[str, ...] = ()
    #: Glob patterns of the weights quantization keeps above the scheme by default (``--keep``
    #: adds to them, ``--quantize-all`` drops them), and the lowest precision measured safe for
    #: them: ``int8`` (kept at int8 under int4) or ``float``.
    quant_sensitive: tuple[str, ...] = ()
    quant_sensitive_floor: str = "float"

    def effective_generation(self, gen: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's generation fields less those this family's ``generate`` overrides:
        what the manifest records and the runtime applies."""
        return {k: v for k, v in gen.items() if k not in self.generation_overridden}

    def can_load(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") in self.model_types

    def load(self, path: Path) -> Any:
        """Load the reference module (fp32, eval mode) from a checkpoint folder."""
        raise NotImplementedError

    def graphs(self, model: Any) -> dict[str, StreamingGraph]:
        """Build the streaming graphs (``prefill`` and ``step``) that share ``model``'s weights."""
        raise NotImplementedError

    def model_config(self, model: Any) -> dict[str, Any]:
        """What the runtime needs to know: ``vocab_size``, ``eos_token_id``, ``bos_token_id``."""
        raise NotImplementedError

    def reference_logits(self, model: Any, input_ids: Any) -> Any:
        """Full-sequence logits (batch, seq, vocab) of the reference in its parallel mode."""
        raise NotImplementedError

    def reference_greedy(self, model: Any, input_ids: Any, max_new_tokens: int) -> Any:
        """Greedy new tokens (batch, max_new_tokens) as the reference library generates them."""
        raise NotImplementedError

    def make_test_checkpoint(self, folder: Path, seed: int = 0, **overrides: Any) -> Path:
        """Write a tiny random checkpoint whose outputs vary with its state (for tests)."""
        raise NotImplementedError

    def spike_rates(self, model: Any, x: Any) -> dict[str, list[float]]:
        """Spiking models: each spiking layer's firing rate per stretch of the inputs ``x``, for
        the parity record (a parity input on which nothing fires proves nothing). Empty for
        models without spikes."""
        return {}


def config_from_dict(cls: Any, d: dict[str, Any]) -> Any:
    """Build a family's own config dataclass from ``config.json``: ``model_type`` must be the
    class's, and unknown or missing keys are errors naming the class."""
    import dataclasses

    d = dict(d)
    mt = d.pop("model_type", cls.model_type)
    if mt != cls.model_type:
        raise ValueError(f"model_type {mt!r} is not {cls.model_type!r}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(d) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    missing = sorted(f.name for f in fields if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING and f.name not in d)
    if missing:
        raise ValueError(f"missing {cls.__name__} key(s): {', '.join(missing)}")
    return cls(**d)


def lm_graph_specs(vocab_size: int, state: list[StateSpec]) -> tuple[
        list[TensorSpec], list[TensorSpec], list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of the causal-LM ``prefill`` and ``step`` graphs."""
    prefill_in = [TensorSpec("input_ids", ("batch", "chunk"), "int64")]
    prefill_out = [TensorSpec("logits", ("batch", "chunk", vocab_size), "float32")]
    step_in = [TensorSpec("input_ids", ("batch",), "int64")]
    step_out = [TensorSpec("logits", ("batch", vocab_size), "float32")]
    return prefill_in, prefill_out, step_in, step_out


def trace_specs(state: list[StateSpec], length: int | None = None) -> list[TensorSpec]:
    """The ``verify`` graph's per-position state outputs: ``trace.<name>`` (batch, chunk, ...),
    or for a ``window`` state the whole window, (batch, ..., ``window`` = k-1 + chunk): every
    position's window is a slice of it (``StateSpec.from_trace``), and one output of the window
    the graph has anyway costs no gather and no transpose. ``length``: a graph whose scan runs
    over a static length returns all of its positions (those past the chunk repeat the last
    state), so the trace is its concat itself and no gather copies it to the chunk's length."""
    pos: int | str = length if length else "chunk"
    return [TensorSpec(f"trace.{s.name}", ("batch", *s.shape[1:-1], "window")
                       if s.kind == "window" else ("batch", pos, *s.shape[1:]), s.dtype)
            for s in state]


def exit_graph_from_step(step: Any, state: list[StateSpec], vocab_size: int, layers: int
                         ) -> StreamingGraph:
    """``exit_step`` of a causal LM: its step module cut after ``layers`` layers (the module's
    ``layers`` list; the final norm and head stay), over the first layers' state. Kangaroo
    (Liu et al., 2024) drafts with such a shallow sub-network of the target itself: no second
    model in memory, and the drafter's state is a prefix of the target's."""
    n = len(step.layers)
    if not 1 <= layers < n:
        raise BundleError(f"--early-exit {layers}: the model has {n} layers; give 1 to {n - 1}")
    per_layer = len(state) // n
    step.layers = step.layers[:layers]
    st = state[:per_layer * layers]
    _, _, s_in, s_out = lm_graph_specs(vocab_size, st)
    return StreamingGraph("exit_step", step, s_in, s_out, st)


DRAFT_LOOP_MAX = 32


def draft_loop_from_step(step: StreamingGraph, k: int) -> StreamingGraph:
    """``draft_loop`` of a causal LM: ``k`` greedy steps of its ``step`` graph in one call,
    returning the k tokens and the state after each (``trace.<name>``, (batch, k, ...)).

    A small draft model's step is cheap; what a speculative round pays per drafted token is
    the call around it (binding, dispatch, a snapshot for rollback). One call drafts the whole
    chain, and the per-step states it returns are the rollback points (as the target's
    ``verify`` traces are). The argmax runs inside the graph, so the tokens never leave it
    between steps.
    """
    import torch
    from torch import nn

    if not 1 <= k <= DRAFT_LOOP_MAX:
        raise BundleError(f"--draft-loop {k}: give 1 to {DRAFT_LOOP_MAX} tokens")

    class _Loop(nn.Module):
        def __init__(self, inner: nn.Module, k: int):
            super().__init__()
            self.inner, self.k = inner, k

        def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple:
            tok, toks, traces = input_ids, [], [[] for _ in state]
            for _ in range(self.k):
                out = self.inner(tok, *state)
                state = out[1:]
                tok = out[0].argmax(-1)
                toks.append(tok)
                for t, s in zip(traces, state):
                    t.append(s)
            return (torch.stack(toks, 1), *(torch.stack(t, 1) for t in traces), *state)

    outs = [TensorSpec("tokens", ("batch", k), "int64")] + [
        TensorSpec(f"trace.{s.name}", ("batch", k, *s.shape[1:]), s.dtype) for s in step.state]
    return StreamingGraph("draft_loop", _Loop(step.module, k).eval(), list(step.inputs), outs,
                          list(step.state))


def detect_family(config: dict[str, Any], path: Path) -> Any:
    """The registered family that loads this config, or a clear error listing what is supported."""
    from edgeseq.registry import families

    for cls in families().values():
        fam = cls()
        if fam.can_load(config):
            return fam
    supported = sorted({t for cls in families().values() for t in cls.model_types})
    arch = config.get("model_type") or config.get("architectures") or "none given"
    raise BundleError(f"{path}: unsupported architecture {arch!r} (model_type); "
                      f"supported: {', '.join(supported)}")


class TransformersCausalLM(Family):
    """A family whose reference is a transformers ``*ForCausalLM``: its own forward for logits
    and its own ``generate`` for greedy tokens."""

    def model_config(self, model: Any) -> dict[str, Any]:
        c = model.config
        return {"vocab_size": c.vocab_size, "eos_token_id": c.eos_token_id,
                "bos_token_id": c.bos_token_id, "pad_token_id": c.pad_token_id,
                "d_model": c.hidden_size, "n_layers": c.num_hidden_layers}

    def reference_logits(self, model: Any, input_ids: Any) -> Any:
        import torch

        with torch.no_grad():
            return model(input_ids, use_cache=False).logits.float()

    def reference_greedy(self, model: Any, input_ids: Any, max_new_tokens: int) -> Any:
        import torch

        with torch.no_grad():
            return hf_greedy(model, input_ids, max_new_tokens)


def hf_greedy(model: Any, input_ids: Any, max_new_tokens: int) -> Any:
    """transformers' own ``generate``, greedy, exactly ``max_new_tokens`` (EOS does not stop it)."""
    import torch
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=0, num_beams=1)
    # generate() refills an unset eos_token_id from the model's own generation config, and would
    # then stop early at EOS: clear it there for the call.
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(input_ids, generation_config=gen,
                             attention_mask=torch.ones_like(input_ids))
    finally:
        model.generation_config.eos_token_id = saved
    return out[:, input_ids.shape[1]:]
