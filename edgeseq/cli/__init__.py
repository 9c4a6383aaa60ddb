"""The ``edgeseq`` command line. It only parses arguments and calls library functions."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from edgeseq.bundle import BundleError
from edgeseq.cli.common import DEBUG_ENV, _describe, _fail, _finite, _json
from edgeseq.cli.inspection import _inspect, _quant_parity_lines, _verify, partition_lines
from edgeseq.cli.runners import RunOptions, _run_speculative
from edgeseq.families.base import DRAFT_LOOP_MAX
from edgeseq.generation import CAUSAL_MAX_NEW_TOKENS
from edgeseq.quiet import quiet_third_party
from edgeseq.registry import backends

quiet_third_party()

#: ``--quant``: fp16, and every scheme a registered backend implements (``Backend.quant_schemes``)
_QUANT_CHOICES = list(dict.fromkeys(
    ["fp16", *(s for cls in backends().values() for s in cls.quant_schemes)]))

class _Command(click.Command):
    """A command whose every failure ends in one ``edgeseq: error:`` line: the library raises
    one-line ``BundleError``/``LimitError``s for what it expects; anything else (a runtime's own
    exception on a damaged file) is summarised against the command's main argument, since a
    traceback tells a user of a shipped bundle nothing (``EDGESEQ_DEBUG=1`` shows it)."""

    def invoke(self, ctx: click.Context) -> Any:
        from edgeseq.limits import LimitError, NumericError

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            # the user asked to stop: no message, the shell's convention for SIGINT
            sys.exit(130)
        except BrokenPipeError:
            raise  # click closes stdout quietly (a reader such as `head` went away)
        except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            if isinstance(e, (BundleError, LimitError)):
                _fail(str(e))  # already names its file or option
            if isinstance(e, NumericError):
                _fail(str(e), 1)
            target = _main_argument(ctx)
            if isinstance(e, OSError) and e.filename:
                _fail(f"{e.filename}: {e.strerror or _describe(e)}")
            _fail(f"{target}: {type(e).__name__}: {_describe(e)} (unexpected; {DEBUG_ENV}=1 "
                  f"shows the traceback)", 1)


def _main_argument(ctx: click.Context) -> str:
    """What a failed command was working on: its bundle or checkpoint, else its name."""
    for key in ("bundle", "checkpoint"):
        if ctx.params.get(key):
            return str(ctx.params[key])
    paths = ctx.params.get("device_paths")
    if paths:
        return ", ".join(map(str, paths))
    return ctx.info_name or "edgeseq"


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeseq")
def main() -> None:
    """Turn trained sequence models into stateful streaming graphs and run them on the edge."""


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", "output", required=True, help="Bundle folder to write.")
@click.option("--format", "fmt", default=None,
              help="Comma-separated graph formats: onnx (ONNX Runtime), pte (ExecuTorch), "
                   "openvino (OpenVINO IR), pt2 (torch.export, the PyTorch reference backend); "
                   "all = onnx,pte,openvino,pt2. "
                   "[default: onnx,pte; onnx with --quant int4-tensor]")
@click.option("--target", "target", default=None, metavar="DEVICE_ID|FILE",
              help="Lower for a device profile's preferred backends (edgeseq devices), in its "
                   "order, skipping those that cannot be produced here (a line says what is "
                   "missing); edgeseq run then uses the first by default. Not with --format.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--parity-tokens", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Greedy tokens compared against the source model.")
@click.option("--skip-parity", is_flag=True, help="Do not check parity (not recommended).")
@click.option("--force", is_flag=True, help="Write the bundle even if parity fails.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--max-target-len", type=click.IntRange(2), default=None,
              help="Encoder-decoders: a fixed-capacity self-attention cache of N positions "
                   "(static shapes, for NPUs and ExecuTorch) instead of a growing one.")
@click.option("--quant", type=click.Choice(_QUANT_CHOICES),
              default=None,
              help="Quantize: fp16 (= --dtype fp16); int8 (per-channel weights, dynamic "
                   "activations) or int4 (grouped weights; ONNX Runtime MatMulNBits, ExecuTorch "
                   "XNNPACK 8da4w); int8-static (QDQ with calibrated activation ranges, for "
                   "NPUs; ONNX only; needs --calibration); int4-tensor (one scale per matrix, "
                   "ONNX only: for testing the gate). State stays float32.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="int8-static: data to calibrate activation ranges on, in --eval's formats.")
@click.option("--group-size", type=click.IntRange(16), default=None,
              help="int4: weights per scale (a power of two). Default: the backend's own "
                   "(its kernels' fastest; docs/quant.md), recorded per format in the manifest.")
@click.option("--keep", multiple=True,
              help="Weights (glob on weight names) to keep in float; repeatable. The family's "
                   "sensitive layers are kept apart anyway: float under int8, int8 under int4.")
@click.option("--quantize-all", is_flag=True,
              help="Quantize the sensitive layers with the scheme too.")
@click.option("--eval", "eval_file", type=click.Path(dir_okay=False), default=None,
              help="Held-out data for the accuracy gate: a text file (language models), one "
                   "source per line with an optional TAB and reference (encoder-decoders; a WAV "
                   "path per line for speech), or an .npz with x (and y) (classifiers).")
@click.option("--max-drop", type=click.FloatRange(0, 1), default=None,
              help="Gate threshold: largest allowed drop in agreement/accuracy "
                   "(default 0.10 for language models, 0.02 for classifiers).")
@click.option("--early-exit", type=click.IntRange(1), default=None, metavar="N",
              help="Generating models: also write exit_step (the first N layers plus the head) "
                   "for self-speculative drafting: edgeseq run --speculate early-exit:N.")
@click.option("--draft-loop", type=click.IntRange(1, DRAFT_LOOP_MAX), default=None, metavar="K",
              help="Causal LMs used as draft models: also write draft_loop (K greedy steps in "
                   "one call), which --speculate draft:PATH then drafts with.")
@click.option("--distill", "distill_recipe", default=None, metavar="RECIPE",
              help="Distill CHECKPOINT first (edgeseq distill; docs/distill.md): draft writes "
                   "the model's bundle with its distilled draft inside, recorded in the "
                   "manifest for --speculate draft; shrink writes the student's bundle.")
@click.option("--distill-data", type=click.Path(dir_okay=False), default=None,
              help="With --distill: the data (as edgeseq distill --data).")
@click.option("--distill-steps", type=click.IntRange(1), default=None,
              help="With --distill: training steps (default: the recipe's).")
@click.option("--distill-time", type=click.FloatRange(0, min_open=True), default=None,
              help="With --distill: training seconds at most (default: the recipe's).")
@click.option("-q", "--quiet", is_flag=True)
def convert(checkpoint: str, output: str, fmt: str | None, dtype: str, parity_tokens: int,
            skip_parity: bool, force: bool, overwrite: bool, max_target_len: int | None,
            quant: str | None, group_size: int | None, keep: tuple[str, ...], quantize_all: bool,
            eval_file: str | None, max_drop: float | None, calibration: str | None,
            early_exit: int | None, draft_loop: int | None, distill_recipe: str | None,
            distill_data: str | None, distill_steps: int | None, distill_time: float | None,
            quiet: bool, target: str | None) -> None:
    """Convert CHECKPOINT (a folder, or zoo:NAME) into a bundle."""
    from edgeseq.convert.pipeline import ALL_FORMATS, convert as _convert

    if quant == "fp16":
        dtype, quant = "fp16", None
    extra: dict = {}
    if target is not None:
        if fmt is not None:
            _fail("give --target (the device's preferred formats) or --format, not both")
        from edgeseq.convert.targets import plan
        from edgeseq.devices import DeviceError
        from edgeseq.devices.catalog import get_profile

        try:
            chosen = plan(get_profile(target))
        except (DeviceError, BundleError) as e:
            _fail(str(e))
        for line in chosen.skipped:
            click.echo(f"--target {chosen.device_id}: skipping {line}", err=True)
        fmt = ",".join(chosen.formats)
        extra = dict(target=chosen.device_id, devices=chosen.devices,
                     preferred=tuple(chosen.backends))
    if fmt is None:
        fmt = "onnx" if quant in ("int4-tensor", "int8-static") else "onnx,pte"
    formats = ALL_FORMATS if fmt == "all" else tuple(f.strip() for f in fmt.split(",") if f.strip())
    if not formats:  # "," would write a bundle with no graphs whose parity trivially passed
        _fail(f"--format {fmt!r}: no format given; use onnx, pte, pt2 (comma-separated) or all")
    progress = None if quiet else (lambda m: click.echo(m, err=True))
    kw = dict(formats=formats, dtype=dtype, parity_tokens=parity_tokens,
              overwrite=overwrite, skip_parity=skip_parity, force=force,
              max_target_len=max_target_len, quant=quant, group_size=group_size,
              keep=list(keep), quantize_all=quantize_all,
              eval_file=eval_file, max_drop=max_drop, calibration=calibration,
              early_exit=early_exit, draft_loop=draft_loop, progress=progress, **extra)
    try:
        if distill_recipe is None:
            if distill_data or distill_steps or distill_time:
                _fail("--distill-data/--distill-steps/--distill-time need --distill RECIPE")
            _convert(checkpoint, output, **kw)
            return
        from edgeseq.convert.distill.chain import convert_distilled

        convert_distilled(checkpoint, output, distill_recipe, data=distill_data,
                          steps=distill_steps, seconds=distill_time, bar=not quiet, **kw)
    except BundleError as e:
        _fail(str(e))


@main.command()
@click.argument("checkpoint")
@click.option("-o", "--output", "output", required=True,
              help="Student checkpoint folder to write (edgeseq convert takes it).")
@click.option("--recipe", default="draft", show_default=True,
              help="draft: a small model of the teacher's family and tokenizer for speculative "
                   "decoding; shrink: the teacher's first and last layers, trained to replace "
                   "it (docs/distill.md).")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="Training data: text lines (text models), WAV paths one per line (speech), "
                   "an .npy (examples, frames, features) (classifiers). Default: built-in "
                   "prompts continued by the teacher's own generations.")
@click.option("--steps", type=click.IntRange(1), default=None,
              help="Training steps (default: the recipe's, within 15 minutes on 2 cores for "
                   "the zoo's teachers).")
@click.option("--time", "seconds", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop training after this many seconds (default: the recipe's).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the student, the data and its order: the same seed, the same loss "
                   "curve.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its checkpoint (OUTPUT.resume/).")
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="Intra-op threads per process (more cores: more processes, torchrun).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or messages.")
def distill(checkpoint: str, output: str, recipe: str, data: str | None, steps: int | None,
            seconds: float | None, seed: int, resume: bool, threads: int, overwrite: bool,
            quiet: bool) -> None:
    """Distill CHECKPOINT (a folder, or zoo:NAME; the teacher) into a student checkpoint
    folder. Runs under torchrun for several processes (rank 0 writes)."""
    from edgeseq.convert.distill import distill as _distill
    from edgeseq.convert.distill.loop import Interrupted, close_distributed

    try:
        _distill(checkpoint, output, recipe, data=data, steps=steps, seconds=seconds,
                 seed=seed, resume=resume, overwrite=overwrite,
                 progress=None if quiet else (lambda m: click.echo(m, err=True)),
                 bar=not quiet, threads=threads)
    except Interrupted as e:
        _fail(str(e), 130)
    finally:
        close_distributed()


@main.command()
@click.argument("bundle")
@click.option("--prompt", "--text", "prompt",
              help="Prompt text (causal LMs) or source text for an encoder-decoder.")
@click.option("--prompt-file", "--text-file", "prompt_file", type=click.Path(dir_okay=False),
              help="Read the prompt (causal LMs) or source text (encoder-decoders) from a UTF-8 "
                   "file instead of --prompt/--text (for inputs too long for a command line).")
@click.option("--prompt-ids", help="Prompt (or source) token ids, comma-separated: 1,2,3")
@click.option("--audio", type=click.Path(dir_okay=False),
              help="Speech models: a WAV file to transcribe (other rates are resampled).")
@click.option("--input", "input_npy", type=click.Path(dir_okay=False),
              help="Sequence classifiers: a .npy array (frames x features) to classify.")
@click.option("--early-exit", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="With --input: also report the first frame at which the running prediction "
                   "reaches this confidence and stays unchanged to the end.")
@click.option("--stream", "stream_audio", is_flag=True,
              help="With --audio: feed the audio in chunks and print words as they become stable.")
@click.option("--chunk-seconds", type=click.FloatRange(0.1, 30), default=1.0, show_default=True)
@click.option("--window", "window_s", type=click.FloatRange(1, 30), default=None,
              help="Speech: encoder window in seconds for short audio (default: the model's).")
@click.option("--agreement", type=click.IntRange(1, 10), default=3, show_default=True,
              help="With --stream: consecutive decodes that must agree before a word is printed.")
@click.option("--language", default=None, metavar="auto|CODE",
              help="Whisper: the spoken language (en, de, ...) or auto (detect it from the first "
                   "window; the default for multilingual models).")
@click.option("--task", default=None, metavar="NAME",
              help="Whisper: transcribe or translate (to English). Text models: a task the "
                   "checkpoint declares in task_specific_params (T5: translation_en_to_de, "
                   "summarization, ...): its prefix and generation settings.")
@click.option("--timestamps", is_flag=True,
              help="Whisper: apply the timestamp rules and print segments with start and end "
                   "times (audio longer than 30 s is then decoded sequentially, as transformers "
                   "does).")
@click.option("--num-beams", type=click.IntRange(1), default=None,
              help="Encoder-decoders: beam search width (default: the checkpoint's config).")
@click.option("--num-beam-groups", type=click.IntRange(1), default=None,
              help="Diverse beam search: number of groups.")
@click.option("--diversity-penalty", type=float, default=None)
@click.option("--length-penalty", type=float, default=None)
@click.option("-n", "--max-new-tokens", type=click.IntRange(0), default=None,
              help="Most new tokens (default: the checkpoint's generation config for "
                   "encoder-decoders: max_new_tokens, else max_length, as transformers; "
                   f"{CAUSAL_MAX_NEW_TOKENS} for causal LMs).")
@click.option("--backend", type=click.Choice(list(backends())), default=None,
              help="The runtime to run the bundle on [default: the first of the bundle's "
                   "target backends (convert --target) available here, else ort].")
@click.option("--do-sample/--greedy", default=None,
              help="Sample, or decode greedily (default: the checkpoint's generation config for "
                   "encoder-decoders, which samples when it sets do_sample; greedy for causal "
                   "LMs).")
@click.option("--temperature", type=float, default=None,
              help="Sampling temperature (default: the checkpoint's; 1.0).")
@click.option("--top-k", type=click.IntRange(0), default=None,
              help="Sample from the k likeliest tokens, 0 for all (default: the checkpoint's "
                   "for encoder-decoders, transformers' 50 if it sets none; 0 for causal LMs).")
@click.option("--top-p", type=float, default=None,
              help="Nucleus sampling mass (default: the checkpoint's; 1.0).")
@click.option("--seed", type=int, default=None)
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Intra-op threads (default: cores).")
@click.option("--speculate", default=None, metavar="SOURCE",
              help="Speculative decoding (greedy output unchanged): auto, off, input (copy the "
                   "input: Aggressive Decoding), ngram (prompt lookup), recycle (Token "
                   "Recycling), draft:PATH (a smaller bundle, same tokenizer), draft (the one "
                   "convert --distill draft recorded in the bundle), early-exit:N "
                   "(the first N layers; convert with --early-exit N).")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Bytes the process may grow by (512M, 2G): the memory plan picks draft "
                   "length, tree width and rollback, or plain decoding, to fit; a model that "
                   "cannot fit fails before loading.")
@click.option("--device", "device_id", default=None, metavar="ID|FILE",
              help="With --speculate: take the memory budget from this device profile's app "
                   "memory (edgeseq devices).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def run(bundle: str, prompt: str | None, prompt_file: str | None, prompt_ids: str | None,
        audio: str | None,
        input_npy: str | None, early_exit: float | None,
        stream_audio: bool, chunk_seconds: float, window_s: float | None, agreement: int,
        language: str | None, task: str | None, timestamps: bool, num_beams: int | None, num_beam_groups: int | None, diversity_penalty: float | None,
        length_penalty: float | None, max_new_tokens: int | None, backend: str,
        do_sample: bool | None, temperature: float | None, top_k: int | None,
        top_p: float | None, seed: int | None, threads: int | None,
        speculate: str | None, memory_budget: str | None, device_id: str | None,
        as_json: bool) -> None:
    """Stream a completion from BUNDLE (causal LM), translate/correct text (encoder-decoder) or
    transcribe a WAV file (speech)."""
    import edgeseq
    from edgeseq.limits import NumericError

    given = [x for x in (prompt, prompt_file, prompt_ids, audio, input_npy) if x is not None]
    if len(given) != 1:
        _fail("give exactly one of --prompt/--text, --prompt-ids, --audio or --input "
              "(--prompt-file/--text-file in place of --prompt/--text)")
    for name, value in (("--temperature", temperature), ("--top-p", top_p),
                        ("--diversity-penalty", diversity_penalty),
                        ("--length-penalty", length_penalty)):
        _finite(name, value)
    if prompt_file is not None:
        from edgeseq.limits import LimitError, read_text_file

        try:
            prompt = read_text_file(prompt_file, what="prompt")
        except LimitError as e:
            _fail(str(e))
    # what a source-length error names: the option, or the file the text came from
    source_name = prompt_file or ("--prompt-ids" if prompt_ids is not None else "--text")
    if speculate is not None or memory_budget is not None or device_id is not None:
        if audio is not None or input_npy is not None:
            _fail("--speculate/--memory-budget apply to text generation (--prompt, --text, "
                  "--prompt-ids); use the library for speech (edgeseq.runtime.speculative)")
        if num_beams is not None and num_beams > 1:
            _fail("--speculate decodes greedily or samples; it does not combine with --num-beams")
        if task is not None:  # the speculative path has no task prefixes: never ignore one
            _fail(f"--task {task}: not available with --speculate/--memory-budget; put the "
                  f"task's prefix in --text instead")
        _run_speculative(bundle, backend, threads, speculate or "auto", memory_budget, device_id,
                         prompt, prompt_ids, max_new_tokens, do_sample, temperature, top_k,
                         top_p, seed, as_json, source_name=source_name)
        return
    opts = RunOptions(bundle, prompt, prompt_ids, audio, input_npy, early_exit, stream_audio,
                      chunk_seconds, window_s, agreement, language, task, timestamps, num_beams,
                      num_beam_groups, diversity_penalty, length_penalty, max_new_tokens,
                      do_sample, temperature, top_k, top_p, seed, as_json, source_name)
    try:
        sess = edgeseq.load(bundle, backend=backend, threads=threads)
        kind = sess.task
        # an input option the bundle's task does not read: named before anything runs
        if input_npy is not None and kind.cli_input != "frames":
            _fail("--input needs a sequence-classifier bundle (this one generates tokens)")
        if audio is not None and kind.cli_input == "text":
            _fail("--audio needs a speech model bundle (this one takes text)")
        kind.part("cli_runner")(sess, opts)
    except (BundleError, ValueError) as e:
        _fail(str(e))
    except NumericError as e:  # the model produced NaN: its weights or state are broken
        _fail(f"{bundle}: {e}", 1)


@main.command()
@click.argument("bundle")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--verify", is_flag=True,
              help="Check every file's SHA-256 against the manifest's record (a bundle from "
                   "elsewhere): one line per problem and exit 1, or \"verified N files\".")
def inspect(bundle: str, as_json: bool, verify: bool) -> None:
    """Show what BUNDLE holds: graphs, state and its bytes, weights by dtype, quantization and
    the parity / accuracy-gate results."""
    from edgeseq.bundle import read_manifest

    if verify:
        _verify(bundle)
        return
    try:
        info = _inspect(Path(bundle), read_manifest(bundle))
    except BundleError as e:
        _fail(str(e))
    if as_json:
        _json(info, bundle, indent=2)
        return
    try:
        tail = partition_lines(info) + _quant_parity_lines(info)
    except (KeyError, TypeError, AttributeError, ValueError):
        # parity.json's shape was checked on reading; the quantization record is the manifest's
        _fail(f"{Path(bundle) / 'manifest.json'}: quantization record is not what convert "
              f"writes (or {Path(bundle) / 'parity.json'} is not its report)")
    click.echo(f"{bundle}: {info['family']} ({info['task']}), interface dtype {info['dtype']}, "
               f"target {info['target']}"
               + (f" (backends, preferred first: {', '.join(info['backends'])})"
                  if info["backends"] else ""))
    for name, g in info["graphs"].items():
        ins = ", ".join(f"{t['name']} {tuple(t['shape'])}" for t in g["inputs"])
        outs = ", ".join(f"{t['name']} {tuple(t['shape'])}" for t in g["outputs"])
        click.echo(f"  graph {name} [{', '.join(g['files'])}]: ({ins}) -> ({outs})")
    st = info["state"]
    click.echo(f"  state: {len(st['tensors'])} tensors, {st['bytes_batch1']} bytes at batch 1"
               + (f" + {st['bytes_per_position']} bytes per cached position" if st["bytes_per_position"] else ""))
    for t in st["tensors"]:
        click.echo(f"    {t['name']:28s} {t['kind']:9s} {t['dtype']:8s} {tuple(t['shape'])}")
    for fmt, w in info["weights"].items():
        click.echo(f"  weights ({fmt}): " + ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in w.items()))
    click.echo("\n".join(tail))


@main.command("zoo")
@click.option("--json", "as_json", is_flag=True)
def zoo_cmd(as_json: bool) -> None:
    """List the embedded models (use them as zoo:NAME)."""
    from edgeseq import zoo

    rows: list[dict[str, Any]] = [
        {"name": m.name, "family": m.family, "task": m.task, "description": m.description,
         "path": str(m.path), "available": m.available, "train_script": m.train_script}
        for m in zoo.MODELS]
    if as_json:
        _json(rows, "zoo", indent=2)
        return
    for r in rows:
        click.echo(f"zoo:{r['name']:<16} {r['family']:<8} {r['task']:<10} {r['description']}")


_NOT_CALIBRATED = "not calibrated (run with --calibrate)"


@main.command("devices")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--devices", "device_paths", multiple=True, type=click.Path(),
              help="A device .toml file or a folder of them; repeatable (also "
                   "$EDGESEQ_DEVICES, os.pathsep-separated).")
@click.option("--calibrate", is_flag=True,
              help="Measure this host now (a few seconds) and cache the result.")
def devices_cmd(as_json: bool, device_paths: tuple[str, ...], calibrate: bool) -> None:
    """List the target device profiles: app memory, DRAM bandwidth, peak throughput, NPU and
    preferred backends (see docs/devices.md)."""
    from edgeseq.devices import DeviceError, calibrate_host, load_profiles

    try:
        profiles = load_profiles([Path(p) for p in device_paths])
        if calibrate:
            click.echo("calibrating this host (a few seconds)...", err=True)
            profiles["host"] = calibrate_host(force=True)
    except DeviceError as e:
        _fail(str(e))
    rows = [p.summary() for p in profiles.values()]
    if as_json:
        for r in rows:
            if not r["calibrated"]:
                r["note"] = _NOT_CALIBRATED
        _json(rows, ", ".join(device_paths) or "devices", indent=2)
        return
    click.echo(f"{'id':<26} {'name':<46} {'app GB':>7} {'BW GB/s':>8} {'fp32 GOP/s':>10} "
               f"{'int8 GOP/s':>10} {'NPU TOPS':>8}  backends")
    for r in rows:
        head = f"{r['id']:<26} {r['name'][:46]:<46}"
        if not r["calibrated"]:
            click.echo(f"{head} {_NOT_CALIBRATED}")
            continue
        peak = r["cpu"]["peak_ops_per_s"]

        def g(v: float | None, scale: float, fmt: str = ".1f") -> str:
            return "-" if v is None else format(v / scale, fmt)

        npu = r["npu"]["tops"] if r["npu"] and r["npu"].get("tops") is not None else None
        click.echo(f"{head} {g(r['app_memory_bytes'], 1e9):>7} "
                   f"{g(r['dram_bandwidth_bytes_per_s'], 1e9):>8} "
                   f"{g(peak.get('fp32'), 1e9, '.0f'):>10} {g(peak.get('int8'), 1e9, '.0f'):>10} "
                   f"{g(npu, 1, 'g'):>8}  {', '.join(r['backends'][:2])}")


@main.command("profile")
@click.argument("bundle")
@click.option("--device", "device_names", multiple=True, default=("host",), show_default=True,
              help="Device to project onto: an id, a .toml file, or `all`; repeatable (the first "
                   "is the one `projected` reports).")
@click.option("--devices", "device_paths", multiple=True, type=click.Path(),
              help="Extra device .toml files or folders; repeatable.")
@click.option("--backend", type=click.Choice(["ort", "executorch"]), default="ort",
              show_default=True)
@click.option("--tokens", type=click.IntRange(2, 100_000), default=128, show_default=True,
              help="Decode steps (tokens; frames for classifiers) to measure.")
@click.option("--prompt-len", type=click.IntRange(1, 100_000), default=16, show_default=True,
              help="Prompt (causal LM) or source (encoder-decoder) length in tokens.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Intra-op threads for ONNX Runtime (default: physical cores; ExecuTorch uses "
                   "its threadpool default).")
@click.option("--memory-budget", default=None,
              help="Bytes the app may use, e.g. 512M or 2G (default: the device's app memory).")
@click.option("--target-latency", type=click.FloatRange(0, min_open=True), default=None,
              help="Latency target in ms per step (token or frame; per window for speech).")
@click.option("--ops/--no-ops", default=True, show_default=True,
              help="Time per operator (ONNX Runtime profiler / ExecuTorch ETDump).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Write a self-contained HTML report with plots.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--from-report", "from_report", type=click.Path(dir_okay=False), default=None,
              help="Reuse the measurement of a previous --json report (same bundle) instead of "
                   "measuring again; only the projections are recomputed.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def profile_cmd(bundle: str, device_names: tuple[str, ...], device_paths: tuple[str, ...],
                backend: str, tokens: int, prompt_len: int, threads: int | None,
                memory_budget: str | None, target_latency: float | None, ops: bool,
                html_path: str | None, as_json: bool, from_report: str | None,
                quiet: bool) -> None:
    """Measure BUNDLE on this host (latency, tokens/s or real-time factor, peak memory split,
    time per operator) and project it onto devices with a calibrated roofline: does it fit the
    memory budget, does it meet the latency target, what to change if not (docs/profile.md)."""
    from edgeseq.devices import DeviceError
    from edgeseq.runtime import report
    from edgeseq.runtime.profile import ProfileError, ProfileOptions, parse_size, profile

    budget = None
    if memory_budget is not None:
        try:
            budget = parse_size(memory_budget)
        except ValueError as e:
            _fail(f"--memory-budget: {e}")
    measured = None
    if from_report is not None:
        try:
            old = json.loads(Path(from_report).read_text())
            measured = {**old["measured"], "op_breakdown": old.get("op_breakdown"),
                        "op_breakdown_note": old.get("op_breakdown_note")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            _fail(f"--from-report {from_report}: not a profile --json report ({e})")
    opts = ProfileOptions(backend=backend, tokens=tokens, prompt_len=prompt_len, threads=threads,
                          ops=ops, memory_budget=budget, target_latency_ms=target_latency,
                          devices=list(device_names), device_paths=[Path(p) for p in device_paths])
    progress = None if quiet else (lambda m: click.echo(f"[profile] {m}", err=True))
    try:
        rep = profile(bundle, opts, progress=progress, measured=measured)
    except (BundleError, ProfileError, DeviceError) as e:
        _fail(str(e))
    if html_path is not None:
        Path(html_path).write_text(report.html_report(rep), encoding="utf-8")
        if progress:
            progress(f"wrote {html_path}")
    if as_json:
        _json(rep, bundle, indent=1)
    else:
        click.echo(report.text(rep))


def entry() -> NoReturn:
    """The ``edgeseq`` console script: ``main``, then out without the interpreter's teardown.

    Unloading torch, transformers and the exporters after the work is done takes 0.3-1.0 s of
    every command (measured: 1.04 s after a conversion's imports, 0.04 s with ``os._exit``);
    nothing of edgeseq's is left to clean up by then (bundles are written through
    ``atomic_folder``, temporary folders are context-managed, worker pools are joined)."""
    import logging

    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        click.echo(code, err=True)   # sys.exit("message"), as the interpreter would print it
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe or stream: nothing more to say
            pass
    os._exit(code or 0)

