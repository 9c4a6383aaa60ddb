"""Train the embedded default model ``edgeseq/zoo/mamba-bytes``: a tiny byte-level Mamba LM.

Why: edgeseq needs a real (not randomly initialised) recurrent model to exercise conversion,
streaming and quantisation end to end without a model hub. This script trains a transformers
``MambaForCausalLM`` (vocab = 256 bytes, NUL = bos/eos/pad) on the Python standard library's
own source, which ships with every Python install, so anyone can reproduce it offline on a CPU.

Speed notes (measured on a 2-core CPU shared with other jobs):
* transformers' CPU path ``slow_forward`` scans the sequence with per-step ``select`` ops whose
  backward materialises a full-size zero tensor per step (quadratic in sequence length), and the
  ``use_mambapy`` parallel scan needs the ``mambapy`` package, which is not installed. So training
  swaps in ``SelectiveScan`` below: the same recurrence with a hand-written backward. The model,
  its weights and its saved config are unchanged; eval/generation use the stock transformers path.
* Denormal floats appear in the scan and slowed a training step ~8x, hence ``set_flush_denormal``.
* One intra-op thread ran ~3x faster than two on that shared machine (OpenMP threads stall on
  each other under contention), so ``--threads`` defaults to 1; a fixed step count and thread
  count make runs repeatable.

Usage: python -m edgeseq.zoo.train_mamba_bytes --out edgeseq/zoo/mamba-bytes [--steps N] [--minutes M]
"""
from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MambaConfig, MambaForCausalLM
from transformers.utils import logging as hf_logging

EXCLUDE = {"test", "tests", "idle_test", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


class SelectiveScan(torch.autograd.Function):
    """h_t = exp(dt_t*A) * h_{t-1} + (dt_t*u_t) B_t ;  y_t = h_t . C_t   (time-major tensors).

    Per-step tensors are [batch, d_inner, d_state] and stay in cache, unlike the stock path's
    full [batch, d_inner, seq, d_state] temporaries. Shapes: u, dt [L,B,D]; A [D,N]; Bm, Cm [L,B,N].
    """

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm):  # type: ignore[override]
        L, Bsz, D = u.shape
        dtu, H, h = dt * u, u.new_empty(L, Bsz, D, A.shape[1]), u.new_zeros(Bsz, D, A.shape[1])
        for t in range(L):
            torch.mul(torch.exp(dt[t].unsqueeze(-1) * A), h, out=H[t])
            h = H[t].baddbmm_(dtu[t].unsqueeze(-1), Bm[t].unsqueeze(1))
        ctx.save_for_backward(u, dt, A, Bm, Cm, H)
        return torch.bmm(H.view(L * Bsz, D, -1), Cm.reshape(L * Bsz, -1, 1)).view(L, Bsz, D)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        u, dt, A, Bm, Cm, H = ctx.saved_tensors
        L, Bsz, D, N = H.shape
        gy, dtu = gy.contiguous(), dt * u
        gC = torch.bmm(gy.view(L * Bsz, 1, D), H.view(L * Bsz, D, N)).view(L, Bsz, N)
        g_dtu, g_dt, gB = torch.empty_like(u), torch.zeros_like(dt), torch.empty_like(Bm)
        gA, g = torch.zeros_like(H[0]), torch.zeros_like(H[0])  # g = dLoss/dh_t, carried backwards
        for t in range(L - 1, -1, -1):
            g = torch.baddbmm(g, gy[t].unsqueeze(-1), Cm[t].unsqueeze(1))
            g_dtu[t] = torch.bmm(g, Bm[t].unsqueeze(-1)).squeeze(-1)
            gB[t] = torch.bmm(dtu[t].unsqueeze(1), g).squeeze(1)
            dA = torch.exp(dt[t].unsqueeze(-1) * A)
            if t > 0:  # gradient through the decay exp(dt*A); h_{-1} = 0 contributes nothing
                s = g * H[t - 1] * dA
                g_dt[t] = (s * A).sum(-1)
                gA.addcmul_(s, dt[t].unsqueeze(-1))
            g = g * dA
        return g_dtu * dt, g_dt + g_dtu * u, gA.sum(0), gB, gC


def train_forward(self: torch.nn.Module, x: torch.Tensor, cache_params: object = None,
                  cache_position: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for ``MambaMixer.slow_forward`` during training; identical math, faster scan."""
    if not (self.training and cache_params is None and attention_mask is None):
        return type(self).slow_forward(self, x, cache_params, cache_position, attention_mask)
    hs, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    hs = self.act(self.conv1d(hs)[..., : x.shape[1]]).transpose(1, 2)  # causal depthwise conv
    dt, B, C = torch.split(self.x_proj(hs), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], -1)
    dt = F.softplus(self.dt_proj(dt))
    tm = lambda t: t.transpose(0, 1).contiguous()  # noqa: E731 - batch-major -> time-major
    y = SelectiveScan.apply(tm(hs), tm(dt), -torch.exp(self.A_log.float()), tm(B), tm(C)).transpose(0, 1)
    return self.out_proj((y + hs * self.D) * self.act(gate.transpose(1, 2)))


def stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib root and its sorted .py files; every 50th (index % 50 == 0) is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, sorted(p for p in root.rglob("*.py") if not EXCLUDE & set(p.relative_to(root).parts))


def load_stdlib() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Deterministic byte corpus: sorted stdlib .py files, NUL between files, every 50th held out."""
    _, files = stdlib_files()
    train, val = bytearray(), bytearray()
    for i, p in enumerate(files):
        (val if i % 50 == 0 else train).extend(p.read_bytes().replace(b"\0", b"") + b"\0")
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(val, dtype=torch.uint8).long(), len(files)


@torch.no_grad()
def evaluate(model: MambaForCausalLM, data: torch.Tensor, seq: int, n: int = 64) -> float:
    """Mean loss (nats/byte) over the first n contiguous windows, via the stock eval path."""
    model.eval()
    x = data[: n * seq].view(n, seq)
    loss = sum(model(input_ids=x[i : i + 8], labels=x[i : i + 8]).loss.item() for i in range(0, n, 8)) / (n // 8)
    model.train()
    return loss


def lr_factor(step: int, total: int) -> float:
    """Linear warmup over 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def complete(model: MambaForCausalLM, prompt: str, n: int = 64) -> str:
    """Greedy byte continuation through the stock generate()/cache path used at inference."""
    model.eval()
    ids = torch.tensor([list(prompt.encode())])
    out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return bytes(out[0].tolist()).decode("utf-8", errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="edgeseq/zoo/mamba-bytes")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=13.0, help="safety cap; stops early if hit")
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t_start = time.time()
    hf_logging.set_verbosity_error()  # silence the "fast path not available" notice; see docstring
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    train, val, n_files = load_stdlib()
    cfg = MambaConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=4, state_size=16, expand=2,
                      conv_kernel=4, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_mambapy=False)
    model = MambaForCausalLM(cfg)
    for layer in model.backbone.layers:
        layer.mixer.slow_forward = types.MethodType(train_forward, layer.mixer)
    # No weight decay on A_log/D/norms/biases (as in the reference Mamba recipe).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("A_log")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("A_log"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.steps))
    gen = torch.Generator().manual_seed(1234)
    log = [f"corpus: {n_files} stdlib files, train {train.numel()} bytes, val {val.numel()} bytes",
           f"params: {sum(p.numel() for p in model.parameters())}  args: {vars(args)}"]
    print(*log, sep="\n", flush=True)
    model.train()
    step, ema = 0, None
    while step < args.steps and time.time() - t_start < args.minutes * 60:
        starts = torch.randint(0, train.numel() - args.seq, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps:
            msg = f"step {step} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} t {time.time() - t_start:.0f}s"
            if step % 300 == 0:
                msg += f" val {evaluate(model, val, args.seq):.4f}"
            print(msg, flush=True)
            log.append(msg)
    val_loss = evaluate(model, val, args.seq)
    train_time = time.time() - t_start
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    done = [f"steps {step}/{args.steps} ({'complete' if step == args.steps else 'STOPPED BY --minutes'})",
            f"final train loss (ema) {ema:.4f}  val loss {val_loss:.4f} nats/byte = {val_loss / math.log(2):.4f} bits/byte",
            f"train+eval time {train_time:.0f}s"]
    for prompt in ("def ", "import "):
        done.append(f"greedy {prompt!r}: {complete(model, prompt)!r}")
    done.append(f"total wall time {time.time() - t_start:.0f}s")
    done.append(f"config (non-default): {json.dumps(cfg.to_diff_dict(), sort_keys=True)}")
    print(*done, sep="\n", flush=True)
    (out / "train_log.txt").write_text("\n".join(log + done) + "\n")


if __name__ == "__main__":
    main()
