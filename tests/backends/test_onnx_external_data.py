"""ONNX weights: one shared external data file, each tensor once, readable by plain ORT."""
import numpy as np
import pytest
from safetensors.numpy import load_file

from ..conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_stored_once(bundle_of, checkpoints, family):
    root = bundle_of(family)
    data = (root / "weights.onnx.data").read_bytes()
    params = load_file(checkpoints[family] / "model.safetensors")
    matrices = [(k, a) for k, a in params.items()
                if k.endswith(".weight") and a.ndim == 2 and a.nbytes >= 1024]
    assert matrices
    for name, a in matrices:
        # once, though the prefill and step graphs both read it (constants that the exporter
        # folds from parameters, like S4D's discretised A, may add other tensors): as stored, or
        # transposed for the one-row kernels (runtime/backends/onnxruntime/layout.py)
        copies = data.count(a.tobytes()) + data.count(np.ascontiguousarray(a.T).tobytes())
        assert copies == 1, name
    for g in ("prefill", "step"):
        assert (root / f"{g}.onnx").stat().st_size < len(data)


def test_plain_onnxruntime_opens_the_graphs(bundle_of):
    import onnxruntime as ort

    root = bundle_of("mamba")
    sess = ort.InferenceSession(str(root / "step.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [1 if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = (np.ones(shape, np.int64) if "int64" in i.type
                         else np.zeros(shape, np.float32))
    logits = sess.run(["logits"], feeds)[0]
    assert logits.shape == (1, 97) and np.isfinite(logits).all()


def test_onnx_inputs_carry_the_manifest_names(bundle_of):
    import onnxruntime as ort

    root = bundle_of("mamba")
    sess = ort.InferenceSession(str(root / "prefill.onnx"), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    assert ins["input_ids"] == ["batch", "chunk"]
    assert ins["state_in.layers.0.ssm"][0] == "batch"
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert outs["logits"][:2] == ["batch", "chunk"]


def test_a_growing_cache_is_not_named_as_its_input(bundle_of):
    """The exporter's size of a cache that grows (``past + chunk``) keeps its expression: named
    ``past`` like the input, it would tell ONNX Runtime that both sizes are equal."""
    import onnx

    root = bundle_of("t5")
    for graph, grown in (("decoder_step", {"past + 1", "1 + past"}),
                         ("decoder_chunk", {"past + chunk", "chunk + past"})):
        m = onnx.load(str(root / f"{graph}.onnx"), load_external_data=False)
        dims = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
                for vi in [*m.graph.input, *m.graph.output]}
        assert dims["state_in.self.0.key"][2] == "past"
        assert dims["state_out.self.0.key"][2] in grown, dims["state_out.self.0.key"]
        assert dims["logits"][0] == "batch"


def test_parallel_lowering_writes_what_one_process_writes(checkpoints, tmp_path, monkeypatch):
    """Graphs exported in forked workers (``edgeseq.convert.workers``) give the same files as
    exported one after another in this process."""
    from edgeseq.convert.pipeline import convert

    out = {}
    for jobs in ("1", "3"):
        monkeypatch.setenv("EDGESEQ_JOBS", jobs)
        out[jobs] = convert(checkpoints["mamba"], tmp_path / jobs, formats=("onnx",),
                            skip_parity=True, early_exit=1)
    names = sorted(p.name for p in out["1"].glob("*.onnx*"))
    assert names == sorted(p.name for p in out["3"].glob("*.onnx*"))
    assert {"prefill.onnx", "step.onnx", "exit_step.onnx", "weights.onnx.data"} <= set(names)
    for n in names:
        assert (out["1"] / n).read_bytes() == (out["3"] / n).read_bytes(), n
    assert not list(out["3"].glob(".lowering*"))


def test_a_failing_worker_is_a_clear_error(monkeypatch):
    from edgeseq.convert.workers import WorkerError, run_jobs

    def boom() -> None:
        raise KeyError("no such weight")

    def bad_value() -> None:
        raise ValueError("cannot lower: unsupported op")

    with pytest.raises(WorkerError, match="KeyError: 'no such weight'"):
        run_jobs({"a": lambda: 1, "b": boom}, workers=2)
    with pytest.raises(ValueError, match="unsupported op"):
        run_jobs({"a": bad_value, "b": lambda: 2}, workers=2)
    assert run_jobs({"a": lambda: 1, "b": lambda: 2}, workers=2) == {"a": 1, "b": 2}
