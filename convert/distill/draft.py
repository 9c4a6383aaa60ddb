"""Recipe ``draft``: a small model of the teacher's family and tokenizer that drafts for it in
speculative decoding (DistillSpec, Zhou et al. 2023: a drafter distilled on the models' own
generations agrees with the target where decoding uses it).

- **Causal LMs** (Mamba, Mamba-2, S4D): a student with a quarter of the layers (at least one)
  and half the width, trained by token-level KD (KL at temperature ``T`` against the teacher's
  distribution) on windows of the data — ``--data`` text, else built-in prompts continued by
  the teacher's *sampled* generations — and, for ``on_policy`` of each batch, on prompts
  continued by the teacher's *greedy* bytes: what speculative decoding verifies. This is
  ``edgeseq/zoo/train_mamba_draft.py`` (which trained ``zoo:mamba-bytes-draft``) for any
  causal family and corpus; Mamba trains with that script's fast scan.
- **Encoder-decoders** (T5, BART, Marian, Whisper): the teacher's encoder kept (frozen: the
  draft's encoder outputs are the teacher's) and a decoder of one layer (teachers of up to two)
  or two, the teacher's first and last, trained on the teacher's greedy outputs for the sources
  (sequence-level KD: cross-entropy on its tokens) plus token-level KD on the same positions.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from edgeseq.convert.distill import Recipe, Teacher
from edgeseq.convert.distill.data import PROMPTS
from edgeseq.errors import BundleError

#: families whose draft is a narrower, shallower copy: the config changes that make it
_CAUSAL = ("mamba", "mamba2", "s4d")
#: encoder-decoder families: where the decoder's layers are, and the config key counting them
_DECODERS = {"t5": ("decoder.block", "num_decoder_layers"),
             "bart": ("model.decoder.layers", "decoder_layers"),
             "marian": ("model.decoder.layers", "decoder_layers"),
             "whisper": ("model.decoder.layers", "decoder_layers")}


def _narrow(width: int) -> int:
    """Half the width, a multiple of 16, at least 32."""
    return max(32, (width // 2) // 16 * 16)


def _fewer(layers: int) -> int:
    return max(1, layers // 4)


def _student_changes(family: str, c: Any) -> dict[str, Any]:
    if family == "mamba":
        h = _narrow(c.hidden_size)
        return {"hidden_size": h, "num_hidden_layers": _fewer(c.num_hidden_layers),
                "intermediate_size": int(c.expand * h), "time_step_rank": math.ceil(h / 16),
                "tie_word_embeddings": True}
    if family == "mamba2":
        h = _narrow(c.hidden_size)
        heads = max(1, int(c.expand * h) // c.head_dim)
        return {"hidden_size": h, "num_hidden_layers": _fewer(c.num_hidden_layers),
                "num_heads": heads, "n_groups": math.gcd(c.n_groups, heads),
                "tie_word_embeddings": False}
    if family == "s4d":
        return {"d_model": _narrow(c.d_model), "n_layers": _fewer(c.n_layers)}
    raise AssertionError(family)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per position at ``temperature`` (scaled by T^2, Hinton et al.),
    averaged over the positions ``mask`` keeps."""
    t = temperature
    lp_s = F.log_softmax(student.float() / t, -1)
    lp_t = F.log_softmax(teacher.float() / t, -1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum(-1) * (t * t)
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _is_transformers(model: Any) -> bool:
    # by module, not isinstance: a family of edgeseq's own (S4D) never imports transformers
    return type(model).__module__.startswith("transformers.")


class Draft(Recipe):
    """The recipe's entry: picks the causal or the encoder-decoder draft for the teacher."""

    name = "draft"

    @classmethod
    def refuses(cls, teacher: Teacher) -> str | None:
        fam = teacher.family.name
        if not teacher.task.generates:
            return (f"{fam} ({teacher.family.task}) does not generate tokens, so it has no use "
                    f"for a draft; draft applies to {', '.join(_CAUSAL + tuple(_DECODERS))}")
        if fam not in _CAUSAL and fam not in _DECODERS:
            return f"no draft recipe for the {fam} family yet"
        return None

    @classmethod
    def for_teacher(cls, teacher: Teacher) -> type[Recipe]:
        return Seq2SeqDraft if teacher.task.encoder else CausalDraft


class CausalDraft(Draft):
    default_steps = 800
    default_seconds = 720.0
    lr = 5e-3
    batch = 8           # rows of the global batch
    seq = 128           # tokens per row
    prompt_len = 32     # tokens of prompt before the teacher's continuation
    on_policy = 0.5     # share of each batch from the teacher's greedy continuations
    temperature = 1.0
    max_pool = 256

    def options(self) -> dict[str, Any]:
        c = self._student_config()
        cfg = dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c.to_dict()
        cfg.pop("transformers_version", None)
        return {"student": cfg, "batch": self.batch, "seq": self.seq,
                "prompt_len": self.prompt_len, "on_policy": self.on_policy,
                "temperature": self.temperature, "lr": self.lr}

    def _student_config(self) -> Any:
        c = self.teacher.model.config
        changes = _student_changes(self.teacher.family.name, c)
        if dataclasses.is_dataclass(c):
            return dataclasses.replace(c, **changes)
        return type(c)(**{**c.to_dict(), **changes})

    def build_student(self) -> Any:
        torch.manual_seed(self.seed)
        student = type(self.teacher.model)(self._student_config()).float()
        student.train()
        self._fast(student)
        self._fast(self.teacher.model)
        return student

    def _fast(self, model: Any) -> None:
        if self.teacher.family.name == "mamba":
            # the zoo's training scan: the same function as transformers' CPU path, faster
            from edgeseq.zoo.train_mamba_draft import patch_fast_scan

            patch_fast_scan(model)

    # -- data ------------------------------------------------------------------------------
    def _prompts(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """n prompts of ``prompt_len`` tokens: random slices of the data, else the built-in
        prompts (tokenized, cycled to the length)."""
        src = self._stream if self.data else self._builtin
        rows = []
        for _ in range(n):
            if self.data:
                st = int(torch.randint(len(src) - self.prompt_len, (1,), generator=gen))
                rows.append(src[st:st + self.prompt_len])
            else:
                p = src[int(torch.randint(len(src), (1,), generator=gen))]
                rows.append(p.repeat(math.ceil(self.prompt_len / len(p)))[-self.prompt_len:])
        return torch.stack(rows)

    def _encode(self, text: str) -> torch.Tensor:
        tok = self.teacher.tokenizer
        if tok is None:
            raise BundleError(f"{self.teacher.label}: has no tokenizer, so text cannot become "
                              f"its tokens")
        ids = tok.encode(text)
        vocab = int(self.teacher.family.model_config(self.teacher.model)["vocab_size"])
        if ids and max(ids) >= vocab:
            raise BundleError(f"{self.teacher.label}: its tokenizer gives ids past the "
                              f"vocabulary ({vocab})")
        return torch.tensor(ids, dtype=torch.int64)

    def _continue(self, prompts: torch.Tensor, n: int, sample: bool, seed: int) -> torch.Tensor:
        """prompts continued by n teacher tokens, greedy or sampled at temperature 1 (seeded),
        through the family's own streaming graphs (``prefill`` then ``step``, state carried):
        linear in the length for every causal family, where re-running the model over the
        whole prefix each token (S4D's reference) is quadratic."""
        fam, model = self.teacher.family, self.teacher.model
        if not hasattr(self, "_graphs"):
            self._graphs = fam.graphs(model)
        pre, step = self._graphs["prefill"], self._graphs["step"]
        g = torch.Generator().manual_seed(seed)
        b = prompts.shape[0]
        state = [torch.zeros(s.concrete_shape({"batch": b}), dtype=torch.float32)
                 for s in pre.state]
        chunk = pre.max_chunk or prompts.shape[1]
        with torch.no_grad():
            for i in range(0, prompts.shape[1], chunk):
                out = pre.module(prompts[:, i:i + chunk], *state)
                logits, state = out[0][:, -1], list(out[1:])
            new = []
            for i in range(n):
                tok = (torch.multinomial(logits.float().softmax(-1), 1, generator=g)[:, 0]
                       if sample else logits.argmax(-1))
                new.append(tok)
                if i + 1 < n:
                    out = step.module(tok, *state)
                    logits, state = out[0], list(out[1:])
        # the graphs hold the model's own modules and building them set those to eval mode;
        # the teacher's logits take the training path (Mamba's fast scan; no dropout here)
        model.train()
        return torch.cat([prompts, torch.stack(new, 1).to(prompts.dtype)], 1)

    def prepare(self, steps: int, say: Callable[[str], None]) -> None:
        if self.data:
            self._stream = torch.cat([self._encode(t + "\n") for t in self.data])
            if len(self._stream) < self.seq + 1:
                raise BundleError(f"{self.teacher.label}: --data holds {len(self._stream)} "
                                  f"tokens; a window needs {self.seq + 1}")
        elif self.teacher.tokenizer is None:
            # a checkpoint without a tokenizer (a test's random model): random prompts
            g0 = torch.Generator().manual_seed(40_000 + self.seed)
            vocab = int(self.teacher.family.model_config(self.teacher.model)["vocab_size"])
            self._builtin = [torch.randint(1, vocab, (self.prompt_len,), generator=g0)
                             for _ in PROMPTS]
        else:
            self._builtin = [self._encode(p) for p in PROMPTS]
        g = torch.Generator().manual_seed(20_000 + self.seed)
        n_pool = max(self.batch, min(self.max_pool, steps * self.batch // 2))
        gen_len = self.seq - self.prompt_len
        say(f"[distill] the teacher continues {n_pool} prompts by {gen_len} tokens (greedy"
            + ("" if self.data else f", and {n_pool} sampled") + ")")
        self._greedy = self._continue(self._prompts(n_pool, g), gen_len, False, 0)
        if not self.data:
            self._sampled = self._continue(self._prompts(n_pool, g), gen_len, True,
                                           30_000 + self.seed)
        self._held_out = self._continue(self._prompts(8, g), gen_len, False, 0)

    def _batch(self, gen: torch.Generator) -> torch.Tensor:
        n_on = round(self.batch * self.on_policy)
        rows = [self._greedy[int(i)] for i in torch.randint(len(self._greedy), (n_on,),
                                                             generator=gen)]
        for _ in range(self.batch - n_on):
            if self.data:
                st = int(torch.randint(len(self._stream) - self.seq, (1,), generator=gen))
                rows.append(self._stream[st:st + self.seq])
            else:
                rows.append(self._sampled[int(torch.randint(len(self._sampled), (1,),
                                                            generator=gen))])
        return torch.stack(rows)

    def loss(self, model: Any, step: int, gen: torch.Generator) -> torch.Tensor:
        x = self._batch(gen)[self.dist.rows(self.batch)]
        with torch.no_grad():
            t = _logits(self._call(self.teacher.model, x))
        return kd_loss(_logits(self._call(model, x)), t, self.temperature)

    @staticmethod
    def _call(model: Any, x: torch.Tensor) -> Any:
        inner = getattr(model, "module", model)
        return model(input_ids=x) if _is_transformers(inner) else model(x)

    @torch.no_grad()
    def evaluate(self, student: Any) -> dict[str, float]:
        """Top-1 agreement with the teacher, teacher-forced on held-out greedy continuations
        (what decoding verifies): a proxy for the acceptance rate."""
        was = student.training
        x = self._held_out
        s = _logits(self._call(student, x))[:, self.prompt_len - 1:-1].argmax(-1)
        t = _logits(self._call(self.teacher.model, x))[:, self.prompt_len - 1:-1].argmax(-1)
        student.train(was)
        return {"agreement": float((s == t).float().mean())}

    def save(self, student: Any, folder: Path) -> None:
        student.eval()
        if _is_transformers(student):
            student.save_pretrained(folder, safe_serialization=True)
        else:
            student.save_pretrained(folder)


class Seq2SeqDraft(Draft):
    default_steps = 400
    default_seconds = 720.0
    lr = 1e-3
    batch = 8
    max_pool = 128
    max_new_tokens = 64
    temperature = 1.0
    ce_weight = 1.0     # sequence-level KD: cross-entropy on the teacher's greedy tokens

    def _keep(self) -> list[int]:
        path, _ = _DECODERS[self.teacher.family.name]
        n = len(_get(self.teacher.model, path))
        return [0] if n <= 2 else [0, n - 1]

    def options(self) -> dict[str, Any]:
        return {"decoder_layers": self._keep(), "batch": self.batch,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "ce_weight": self.ce_weight, "lr": self.lr}

    def build_student(self) -> Any:
        path, key = _DECODERS[self.teacher.family.name]
        student = copy.deepcopy(self.teacher.model)
        layers = _get(student, path)
        kept = torch.nn.ModuleList([layers[i] for i in self._keep()])
        for i, layer in enumerate(kept):
            # attention modules index the decoding cache by their layer: renumbered as kept
            for mod in layer.modules():
                if isinstance(getattr(mod, "layer_idx", None), int):
                    mod.layer_idx = i
        parent, _, name = path.rpartition(".")
        setattr(_get(student, parent), name, kept)
        setattr(student.config, key, len(kept))
        student.requires_grad_(False)
        kept.requires_grad_(True)
        self._decoder_params = list(kept.parameters())
        dec = _get(student, parent)
        for norm in ("final_layer_norm", "layer_norm", "layernorm_embedding"):
            if isinstance(getattr(dec, norm, None), torch.nn.Module):
                getattr(dec, norm).requires_grad_(True)
                self._decoder_params += list(getattr(dec, norm).parameters())
        student.train()
        return student

    def trainable(self, student: Any) -> list[Any]:
        return self._decoder_params

    def _sources(self, n: int) -> list[Any]:
        fam, model, tok = self.teacher.family, self.teacher.model, self.teacher.tokenizer
        if fam.speech:
            from edgeseq import audio

            c = model.config
            frames = 2 * c.max_source_positions
            if self.data:
                return [audio.log_mel_spectrogram(a, n_mels=c.num_mel_bins, n_frames=frames)
                        for a in self.data[:n]]
            return [fam.parity_source(model, tok, seed=i) for i in range(n)]
        texts = self.data[:n] if self.data else [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        if tok is None:
            if self.data:
                raise BundleError(f"{self.teacher.label}: has no tokenizer, so --data text "
                                  f"cannot become its tokens")
            return [fam.parity_source(model, None, seed=i) for i in range(n)]
        from edgeseq.tokenize import source_ids

        cfg = {"eos_token_id": model.config.eos_token_id}
        return [source_ids(tok, t, cfg) for t in texts]

    def prepare(self, steps: int, say: Callable[[str], None]) -> None:
        fam, model = self.teacher.family, self.teacher.model
        n = max(self.batch, min(self.max_pool, steps * self.batch // 2))
        if self.data:
            n = min(n, len(self.data))
        say(f"[distill] the teacher decodes {n} sources greedily (sequence-level targets)")
        sources = self._sources(n)
        self._pool = []
        for src in sources:
            prompt = fam.reference_prompt(model, src)
            out = fam.reference_generate(model, src, self.max_new_tokens)
            self._pool.append((src, prompt + [int(t) for t in out]))
        if not any(len(d) > len(fam.reference_prompt(model, s)) for s, d in self._pool):
            raise BundleError(f"{self.teacher.label}: the teacher decodes nothing (only EOS) "
                              f"for {'--data' if self.data else 'the built-in sources'}; give "
                              f"--data it transcribes or translates")
        self._held_out = self._pool[-min(8, len(self._pool)):]

    def _inputs(self, rows: list[tuple[Any, list[int]]]) -> dict[str, torch.Tensor]:
        fam, model = self.teacher.family, self.teacher.model
        pad = model.config.pad_token_id or 0
        if fam.speech:
            enc = {"input_features": torch.stack([torch.as_tensor(s, dtype=torch.float32)
                                                  for s, _ in rows])}
        else:
            n = max(len(s) for s, _ in rows)
            ids = torch.full((len(rows), n), pad, dtype=torch.int64)
            mask = torch.zeros((len(rows), n), dtype=torch.int64)
            for i, (s, _) in enumerate(rows):
                ids[i, :len(s)] = torch.as_tensor(s)
                mask[i, :len(s)] = 1
            enc = {"input_ids": ids, "attention_mask": mask}
        m = max(len(d) for _, d in rows)
        dec = torch.full((len(rows), m), pad, dtype=torch.int64)
        valid = torch.zeros((len(rows), m - 1))
        for i, (_, d) in enumerate(rows):
            dec[i, :len(d)] = torch.as_tensor(d)
            valid[i, :len(d) - 1] = 1
        return {**enc, "decoder_input_ids": dec, "valid": valid}

    def _logits_pair(self, model: Any, rows: list[tuple[Any, list[int]]]
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x = self._inputs(rows)
        teacher = self.teacher.model
        enc_kw = {k: v for k, v in x.items() if k in ("input_ids", "attention_mask",
                                                      "input_features")}
        with torch.no_grad():
            # the student's encoder is the teacher's (frozen): encoded once for both
            encoded = teacher.get_encoder()(**{k: v for k, v in enc_kw.items()
                                               if k != "attention_mask"},
                                            **({"attention_mask": enc_kw["attention_mask"]}
                                               if "attention_mask" in enc_kw else {}))
            kw = {"encoder_outputs": encoded, "decoder_input_ids": x["decoder_input_ids"],
                  "use_cache": False}
            if "attention_mask" in enc_kw:
                kw["attention_mask"] = enc_kw["attention_mask"]
            t = teacher(**kw).logits[:, :-1]
        s = model(**kw).logits[:, :-1]
        return s, t, x

    def loss(self, model: Any, step: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self._pool), (self.batch,), generator=gen)
        rows = [self._pool[int(i)] for i in idx][self.dist.rows(self.batch)]
        s, t, x = self._logits_pair(model, rows)
        valid = x["valid"]
        target = x["decoder_input_ids"][:, 1:]
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), target.reshape(-1),
                             reduction="none").view_as(valid)
        ce = (ce * valid).sum() / valid.sum().clamp(min=1)
        return kd_loss(s, t, self.temperature, valid) + self.ce_weight * ce

    @torch.no_grad()
    def evaluate(self, student: Any) -> dict[str, float]:
        """Top-1 agreement with the teacher on the teacher's own outputs (teacher-forced)."""
        was = student.training
        student.eval()
        s, t, x = self._logits_pair(student, self._held_out)
        student.train(was)
        valid = x["valid"]
        same = (s.argmax(-1) == t.argmax(-1)).float()
        return {"agreement": float((same * valid).sum() / valid.sum().clamp(min=1))}

    def save(self, student: Any, folder: Path) -> None:
        student.eval()
        student.save_pretrained(folder, safe_serialization=True)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


RECIPE = Draft
