"""Train ``edgeseq/zoo/mamba-bytes-draft``: a one-layer byte Mamba that drafts for ``mamba-bytes``.

Why: speculative decoding needs a draft model that shares the target's tokenizer (bytes, vocab
256, NUL = bos/eos/pad) and costs far less per decoding step. On a CPU, a tiny model's step is
dominated by per-operator overhead, which grows with the number of layers, so the draft keeps
ONE Mamba layer and a small width.

It is trained by distillation from the target on the same stdlib byte stream as
``train_mamba_bytes.py`` (whose corpus, fast training scan and lr schedule it imports): the loss
is KL(target softmax at temperature T || draft) plus ``--ce`` times the cross-entropy on the true
next byte. What matters is greedy top-1 agreement with the target (speculative acceptance), so
the log reports that, and the expected accepted length of k-token greedy chains measured by
actually decoding with the target, not just perplexity.

The teacher runs in training mode under ``no_grad`` so that it uses the same fast ``SelectiveScan``
forward (Mamba has no dropout, so this is the same function as the stock eval path). The
teacher's forward is ~2/3 of each training step, which is what bounds the step count.

Configurations tried (1 layer, state 16, expand 2, batch 8 x 256, lr 5e-3, KL only, seed 0; agree
= teacher-forced val top-1 agreement; accepted = mean accepted of k=4 greedy chains; tok/call =
tokens per target call of the greedy speculative loop; step = ONNX Runtime step, 1 thread, where
the target's is 420 us; est. = (tok/call) * 420 / (4 * step + 420), speed-up over plain decoding
if verifying 5 tokens cost one target step):
  hidden  64 tied,    49 k params, 1500 steps, 447 s: agree .706  accepted 2.69  tok/call 3.50  43 us  est. 2.48
  hidden  96 tied,    93 k params, 1500 steps, 478 s: agree .745  accepted 2.91  tok/call 3.80  49 us  est. 2.59
  hidden  96 untied, 118 k params, 1500 steps, 472 s: agree .755  accepted 2.83  tok/call 3.70  48 us  est. 2.54
  hidden 128 tied,   150 k params, 1500 steps, 556 s: agree .778  accepted 3.17  tok/call 4.10  57 us  est. 2.66
  hidden 128 tied,   150 k params, 1300 steps, 459 s: agree .769  accepted 3.13  tok/call 4.06  57 us  est. 2.63
  the same, half of each batch on-policy (``--on-policy 0.5``, the default since 2026-11-23),
                     150 k params, 1300 steps, 477 s: agree .759  accepted 3.28  tok/call 4.17  (kept)
On-policy windows are stdlib prompts (never the benchmark's modules, ``HELD_OUT_MODULES``)
continued by the target's own greedy bytes; teacher-forced agreement on the corpus fell a
little, while acceptance on the target's greedy continuations, which is what decoding sees, rose
(all 4 accepted: .677 -> .734). On ``benchmarks/speculative.py``'s code workload the zoo drafter's
acceptance went from 0.75 to 0.83 (quick run, ONNX Runtime). The shipped ``train_log.txt`` is
that run's (``--out /tmp/draft_op --bench-steps 0``, then copied here).
Untying the head bought nothing. Two layers at hidden 64 cost 74 us a step (untrained, converted),
which would need ~4.4 tokens per call to break even with one layer, so it was not trained. The
1300-step default keeps the run well inside a 10-minute cap: steps ran ~20% slower while the
machine was loaded, and 1500 steps of hidden 128 already took 556 s on a quiet one.

Usage: python -m edgeseq.zoo.train_mamba_draft --out edgeseq/zoo/mamba-bytes-draft [--steps N] [--minutes M]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MambaConfig, MambaForCausalLM
from transformers.utils import logging as hf_logging

from edgeseq.zoo.train_mamba_bytes import (complete, load_stdlib, lr_factor, stdlib_files,
                                           train_forward)

TEACHER = Path(__file__).parent / "mamba-bytes"
COPIED = ("edgeseq_tokenizer.json", "generation_config.json")  # shared tokenizer / special ids
# modules whose source benchmarks/speculative.py continues: never prompts of the on-policy pool
HELD_OUT_MODULES = ("textwrap", "zipfile")


def patch_fast_scan(model: MambaForCausalLM) -> MambaForCausalLM:
    for layer in model.backbone.layers:
        layer.mixer.slow_forward = types.MethodType(train_forward, layer.mixer)
    return model


@torch.no_grad()
def teacher_logits(teacher: MambaForCausalLM, x: torch.Tensor) -> torch.Tensor:
    teacher.train()  # fast scan path (see module docstring); no dropout in Mamba
    return teacher(input_ids=x).logits


@torch.no_grad()
def eval_windows(draft: MambaForCausalLM, teacher: MambaForCausalLM, data: torch.Tensor, seq: int,
                 n: int = 64) -> dict[str, float]:
    """Teacher forcing over the first n contiguous windows, stock eval path for both models.

    agree: P(argmax draft == argmax target) over all n*seq positions; kl: KL(target||draft) nats.
    """
    draft.eval(), teacher.eval()
    x = data[: n * seq].view(n, seq)
    agree = kl = d_ce = t_ce = d_acc = t_acc = 0.0
    for i in range(0, n, 8):
        xb = x[i : i + 8]
        ld, lt = draft(input_ids=xb).logits.float(), teacher(input_ids=xb).logits.float()
        pd, pt = ld.argmax(-1), lt.argmax(-1)
        agree += (pd == pt).float().mean().item()
        lpd, lpt = F.log_softmax(ld, -1), F.log_softmax(lt, -1)
        kl += (lpt.exp() * (lpt - lpd)).sum(-1).mean().item()
        y = xb[:, 1:]
        d_ce += F.cross_entropy(ld[:, :-1].reshape(-1, 256), y.reshape(-1)).item()
        t_ce += F.cross_entropy(lt[:, :-1].reshape(-1, 256), y.reshape(-1)).item()
        d_acc += (pd[:, :-1] == y).float().mean().item()
        t_acc += (pt[:, :-1] == y).float().mean().item()
    draft.train()
    k = n // 8
    return {"agree": agree / k, "kl": kl / k, "draft_ce": d_ce / k, "target_ce": t_ce / k,
            "draft_acc": d_acc / k, "target_acc": t_acc / k}


@torch.no_grad()
def _prefill(model: MambaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    out = model(input_ids=ids, use_cache=True)
    return out.logits[:, -1], out.cache_params


@torch.no_grad()
def _step(model: MambaForCausalLM, tok: torch.Tensor, cache: object, pos: int) -> torch.Tensor:
    out = model(input_ids=tok.view(-1, 1), cache_params=cache, use_cache=True,
                cache_position=torch.tensor([pos]))
    return out.logits[:, -1]


@torch.no_grad()
def greedy(model: MambaForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy bytes after ids [B, L] via the stock cached path; no stopping at NUL."""
    model.eval()
    logits, cache = _prefill(model, ids)
    out = []
    for t in range(n):
        out.append(logits.argmax(-1))
        if t + 1 < n:
            logits = _step(model, out[-1], cache, ids.shape[1] + t)
    return torch.stack(out, 1)


def val_prompts(val: torch.Tensor, n: int, plen: int, gen: int) -> torch.Tensor:
    """n prompts of plen bytes spread evenly over val, each with no NUL (file boundary) within
    plen + gen bytes, so the target continues inside one file."""
    span, out = plen + gen, []
    stride = (val.numel() - span) // n
    for i in range(n):
        s = i * stride
        while (val[s : s + span] == 0).any():
            s += 1
        out.append(val[s : s + plen])
    return torch.stack(out)


@torch.no_grad()
def acceptance(draft: MambaForCausalLM, target: MambaForCausalLM, val: torch.Tensor, k: int = 4,
               n_prompts: int = 20, plen: int = 32, gen: int = 64) -> dict[str, float]:
    """Greedy speculative acceptance, measured by decoding.

    The target greedily continues each prompt by `gen` bytes (reference sequence). At every
    position i of that continuation, the draft (having read prompt + reference[:i]) proposes k
    greedy bytes; accepted = length of the prefix matching reference[i:i+k]. Returns the mean
    accepted length over all positions (0..k, positions with fewer than k reference bytes left
    are skipped), P(first token accepted), and the tokens per target call of an actual greedy
    speculative loop (accepted + 1 bonus token per verification round) over the references.
    """
    prompts = val_prompts(val, n_prompts, plen, gen)
    ref = greedy(target, prompts, gen)  # [P, gen]
    draft.eval()
    acc = torch.zeros(n_prompts, gen - k + 1, dtype=torch.long)
    logits, cache = _prefill(draft, prompts)
    for i in range(gen - k + 1):
        c, lg, prop = copy.deepcopy(cache), logits, []
        for j in range(k):
            prop.append(lg.argmax(-1))
            if j + 1 < k:
                lg = _step(draft, prop[-1], c, plen + i + j)
        match = (torch.stack(prop, 1) == ref[:, i : i + k]).long()
        acc[:, i] = match.cumprod(1).sum(1)
        logits = _step(draft, ref[:, i], cache, plen + i)  # draft reads the true next byte
    # Speculative loop: from position 0, accept acc[p, i] then emit one target token.
    rounds, emitted = 0, 0
    for p in range(n_prompts):
        i = 0
        while i < gen - k + 1:
            a = int(acc[p, i])
            rounds += 1
            emitted += a + 1
            i += a + 1
    return {"mean_accepted": acc.float().mean().item(), "first_accept": (acc > 0).float().mean().item(),
            "tokens_per_round": emitted / rounds, "full_chain": (acc == k).float().mean().item()}


def pool_files() -> list[bytes]:
    """The training split's files (``load_stdlib``'s order and split), less the modules the
    speculative benchmark reads."""
    root, files = stdlib_files()
    return [p.read_bytes().replace(b"\0", b"") for i, p in enumerate(files)
            if i % 50 and not any(m in p.relative_to(root).parts[0] for m in HELD_OUT_MODULES)]


@torch.no_grad()
def on_policy_pool(teacher: MambaForCausalLM, n: int, plen: int, gen: int, seed: int,
                   batch: int = 256) -> torch.Tensor:
    """n windows of (plen stdlib bytes + the target's greedy continuation of gen bytes).

    DistillSpec (Zhou et al., 2023): a drafter distilled on sequences the models themselves
    generate agrees with the target more where it is used, on the target's own greedy
    trajectories (which, for a 1 M-parameter byte model, repeat and loop unlike the corpus)."""
    files = [f for f in pool_files() if len(f) > plen + 1]
    g = torch.Generator().manual_seed(4321 + seed)
    prompts = []
    while len(prompts) < n:
        f = files[int(torch.randint(len(files), (1,), generator=g))]
        st = int(torch.randint(len(f) - plen, (1,), generator=g))
        prompts.append(torch.tensor(list(f[st:st + plen])))
    prompts = torch.stack(prompts)
    outs = [torch.cat([prompts[i:i + batch], greedy(teacher, prompts[i:i + batch], gen)], 1)
            for i in range(0, n, batch)]
    teacher.train()  # back to the fast training scan for teacher_logits
    return torch.cat(outs)


def step_time_us(folder: Path, work: Path, calls: int) -> str:
    """Convert `folder` to an ONNX bundle and time one-token ``step`` calls on ONNX Runtime, 1 thread.

    The same input and state every call (pure per-step cost); best of 3 runs of `calls` calls.
    """
    import numpy as np

    from edgeseq.runtime import session as rs

    bundle = work / folder.name
    p = subprocess.run([sys.executable, "-m", "edgeseq.cli", "convert", str(folder), "-o", str(bundle),
                        "--format", "onnx", "--overwrite", "-q"], capture_output=True, text=True)
    if p.returncode:
        return f"convert failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}"
    s = rs.load(bundle, backend="ort", threads=1)
    x = {"input_ids": np.array([5])}
    for _ in range(50):
        s.model.run("step", x, s._state)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            s.model.run("step", x, s._state)
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return f"{best:.1f} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="edgeseq/zoo/mamba-bytes-draft")
    ap.add_argument("--teacher", default=str(TEACHER))
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--minutes", type=float, default=10.0, help="safety cap on the training loop")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--state", type=int, default=16)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--untied", action="store_true", help="separate lm_head (default: tied to embeddings)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ce", type=float, default=0.0, help="weight of CE on the true next byte")
    ap.add_argument("--on-policy", type=float, default=0.5,
                    help="share of each batch drawn from the target's own greedy continuations")
    ap.add_argument("--pool", type=int, default=1024, help="on-policy windows generated up front")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench-steps", type=int, default=500,
                    help="after training: convert draft and target to ONNX and time this many step calls (0: skip)")
    args = ap.parse_args()
    t_start = time.time()
    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    train, val, n_files = load_stdlib()
    teacher = patch_fast_scan(MambaForCausalLM.from_pretrained(args.teacher))
    teacher.requires_grad_(False)
    tcfg = teacher.config
    cfg = MambaConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      state_size=args.state, expand=args.expand, conv_kernel=tcfg.conv_kernel,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, use_mambapy=False,
                      tie_word_embeddings=not args.untied)
    draft = patch_fast_scan(MambaForCausalLM(cfg))
    decay = [p for n, p in draft.named_parameters() if p.ndim >= 2 and not n.endswith("A_log")]
    rest = [p for n, p in draft.named_parameters() if not (p.ndim >= 2 and not n.endswith("A_log"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
    gen = torch.Generator().manual_seed(1234 + args.seed)
    T = args.temperature
    log = [f"corpus: {n_files} stdlib files, train {train.numel()} bytes, val {val.numel()} bytes",
           f"teacher: {args.teacher} ({sum(p.numel() for p in teacher.parameters())} params)",
           f"params: {sum(p.numel() for p in draft.parameters())}  args: {vars(args)}"]
    print(*log, sep="\n", flush=True)
    n_pol = round(args.batch * args.on_policy)
    pool = None
    if n_pol:
        t0 = time.time()
        pool = on_policy_pool(teacher, args.pool, args.seq // 2, args.seq - args.seq // 2, args.seed)
        log.append(f"on-policy pool: {pool.shape[0]} windows ({args.seq // 2} stdlib bytes + the "
                   f"target's {args.seq - args.seq // 2} greedy bytes), {n_pol}/{args.batch} of each "
                   f"batch, generated in {time.time() - t0:.0f}s")
        print(log[-1], flush=True)
    draft.train()
    step, ema, ema_agree = 0, None, None
    while step < args.steps and time.time() - t_start < args.minutes * 60:
        starts = torch.randint(0, train.numel() - args.seq, (args.batch - n_pol,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts.tolist()])
        if n_pol:
            x = torch.cat([x, pool[torch.randint(0, pool.shape[0], (n_pol,), generator=gen)]])
        lt = teacher_logits(teacher, x).reshape(-1, 256)
        ld = draft(input_ids=x).logits.reshape(-1, 256)
        loss = F.kl_div(F.log_softmax(ld / T, -1), F.log_softmax(lt / T, -1), log_target=True,
                        reduction="batchmean") * T * T
        if args.ce:
            loss = loss + args.ce * F.cross_entropy(ld.view(args.batch, args.seq, 256)[:, :-1].reshape(-1, 256),
                                                    x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        agree = (ld.argmax(-1) == lt.argmax(-1)).float().mean().item()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        ema_agree = agree if ema_agree is None else 0.95 * ema_agree + 0.05 * agree
        if step % 50 == 0 or step == args.steps:
            msg = (f"step {step} loss {ema:.4f} agree {ema_agree:.3f} lr {sched.get_last_lr()[0]:.2e} "
                   f"t {time.time() - t_start:.0f}s")
            print(msg, flush=True)
            log.append(msg)
    train_time = time.time() - t_start
    out = Path(args.out)
    draft.save_pretrained(out, safe_serialization=True)
    for name in COPIED:
        shutil.copyfile(Path(args.teacher) / name, out / name)
    m = eval_windows(draft, teacher, val, args.seq)
    a = acceptance(draft, teacher, val)
    done = [f"steps {step}/{args.steps} ({'complete' if step == args.steps else 'STOPPED BY --minutes'})",
            f"train time {train_time:.0f}s  final train loss (ema) {ema:.4f}",
            f"val teacher forcing (64 windows x {args.seq} bytes): top-1 agreement with target {m['agree']:.4f}  "
            f"KL(target||draft) {m['kl']:.4f} nats",
            f"  draft val loss {m['draft_ce']:.4f} nats/byte ({m['draft_ce'] / math.log(2):.4f} bits), "
            f"next-byte acc {m['draft_acc']:.4f}; target {m['target_ce']:.4f} nats/byte, acc {m['target_acc']:.4f}",
            f"greedy chains k=4 (20 val prompts x 32 bytes, target greedy 64 bytes): mean accepted "
            f"{a['mean_accepted']:.3f}/4, P(1st accepted) {a['first_accept']:.3f}, P(all 4) {a['full_chain']:.3f}, "
            f"tokens per target call in a greedy speculative loop {a['tokens_per_round']:.3f}"]
    for prompt in ("def ", "import "):
        done.append(f"greedy {prompt!r}: {complete(draft, prompt)!r}")
    if args.bench_steps:
        with tempfile.TemporaryDirectory() as work:
            td, tt = (step_time_us(Path(f), Path(work), args.bench_steps) for f in (out, args.teacher))
        done.append(f"ONNX Runtime step time (edgeseq convert --format onnx, 1 thread, best of 3 x "
                    f"{args.bench_steps} calls): draft {td}, target {tt}")
    done.append(f"total wall time {time.time() - t_start:.0f}s")
    done.append(f"config (non-default): {json.dumps(cfg.to_diff_dict(), sort_keys=True)}")
    print(*done, sep="\n", flush=True)
    (out / "train_log.txt").write_text("\n".join(log + done) + "\n")


if __name__ == "__main__":
    main()
