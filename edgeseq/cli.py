"""The ``edgeseq`` command line. It only parses arguments and calls library functions."""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from edgeseq.bundle import BundleError
from edgeseq.quiet import quiet_third_party

quiet_third_party()


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"edgeseq: error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeseq")
def main() -> None:
    """Turn trained sequence models into stateful streaming graphs and run them on the edge."""


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", "output", required=True, help="Bundle folder to write.")
@click.option("--format", "fmt", default="onnx,pte", show_default=True,
              help="Comma-separated graph formats: onnx (ONNX Runtime), pte (ExecuTorch), pt2 "
                   "(torch.export, the PyTorch reference backend); all = onnx,pte,pt2.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--parity-tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Greedy tokens compared against the source model.")
@click.option("--skip-parity", is_flag=True, help="Do not check parity (not recommended).")
@click.option("--force", is_flag=True, help="Write the bundle even if parity fails.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("-q", "--quiet", is_flag=True)
def convert(checkpoint: str, output: str, fmt: str, dtype: str, parity_tokens: int,
            skip_parity: bool, force: bool, overwrite: bool, quiet: bool) -> None:
    """Convert CHECKPOINT (a folder, or zoo:NAME) into a bundle."""
    from edgeseq.convert.pipeline import ALL_FORMATS, convert as _convert

    formats = ALL_FORMATS if fmt == "all" else tuple(f.strip() for f in fmt.split(",") if f.strip())
    try:
        _convert(checkpoint, output, formats=formats, dtype=dtype, parity_tokens=parity_tokens,
                 overwrite=overwrite, skip_parity=skip_parity, force=force,
                 progress=None if quiet else (lambda m: click.echo(m, err=True)))
    except BundleError as e:
        _fail(str(e))


@main.command()
@click.argument("bundle")
@click.option("--prompt", help="Prompt text (needs a bundle with a tokenizer).")
@click.option("--prompt-ids", help="Prompt token ids, comma-separated: 1,2,3")
@click.option("-n", "--max-new-tokens", type=click.IntRange(0), default=64, show_default=True)
@click.option("--backend", type=click.Choice(["ort", "executorch", "torch"]), default="ort",
              show_default=True)
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True)
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(bundle: str, prompt: str | None, prompt_ids: str | None, max_new_tokens: int,
        backend: str, do_sample: bool, temperature: float, top_k: int, top_p: float,
        seed: int | None, threads: int | None, as_json: bool) -> None:
    """Stream a completion from BUNDLE."""
    import edgeseq
    from edgeseq.runtime.streaming import timed_stream

    if (prompt is None) == (prompt_ids is None):
        _fail("give exactly one of --prompt or --prompt-ids")
    try:
        sess = edgeseq.load(bundle, backend=backend, threads=threads)
        if prompt_ids is not None:
            try:
                ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
            except ValueError:
                _fail(f"--prompt-ids: expected comma-separated integers, got {prompt_ids!r}")
            vocab = sess.manifest.config.get("vocab_size")
            if vocab and any(not 0 <= i < vocab for i in ids):
                _fail(f"--prompt-ids: ids must be in [0, {vocab})")
        else:
            ids = sess.encode(prompt)
        if not ids:
            _fail("the prompt is empty")
        printed = ""
        toks: list[int] = []

        def show(tok: int) -> None:
            nonlocal printed
            toks.append(tok)
            text = sess.decode(toks)
            if sess.tokenizer is None:
                text += " "
            if text.startswith(printed):
                click.echo(text[len(printed):], nl=False)
                printed = text

        if not as_json and prompt is not None:
            click.echo(prompt, nl=False)
        res = timed_stream(sess, ids, max_new_tokens, on_token=None if as_json else show,
                           do_sample=do_sample, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed)
    except (BundleError, ValueError) as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps({
            "tokens": res.tokens, "text": sess.decode(res.tokens), "prompt_tokens": len(ids),
            "backend": sess.backend, "first_token_ms": round(res.first_token_ms, 3),
            "tokens_per_s": round(res.tokens_per_s, 3), "total_ms": round(res.total_ms, 3)}))
    else:
        click.echo("")
        click.echo(f"-- {len(res.tokens)} tokens on {sess.backend}: first token "
                   f"{res.first_token_ms:.1f} ms (prompt {len(ids)} tokens), "
                   f"{res.tokens_per_s:.1f} tokens/s", err=True)


@main.command("zoo")
@click.option("--json", "as_json", is_flag=True)
def zoo_cmd(as_json: bool) -> None:
    """List the embedded models (use them as zoo:NAME)."""
    from edgeseq import zoo

    rows: list[dict[str, Any]] = [
        {"name": m.name, "family": m.family, "task": m.task, "description": m.description,
         "path": str(m.path), "available": m.path.is_dir(), "train_script": m.train_script}
        for m in zoo.MODELS]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"zoo:{r['name']:<16} {r['family']:<8} {r['task']:<10} {r['description']}")


if __name__ == "__main__":
    main()
