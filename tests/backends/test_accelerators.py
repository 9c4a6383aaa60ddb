"""The suite for backends that compute in their own precision (``Backend.exact`` False: the
QNN HTP runs float graphs in fp16): each family's bundle runs there, held to the accuracy gate
against the fp32 reference, and the partition report says what the accelerator took.

Encoder-decoders run with the fixed-capacity cache (``max_target_len``): accelerators compile
fixed shapes, and a growing cache moves every step."""
import pytest

from edgeseq.quant.gates import classifier_gate, lm_gate, seq2seq_gate
from edgeseq.registry import backends, families

from ..conftest import CLASSIFIERS, FAMILIES, FIXED_LEN, SEQ2SEQ, accelerator_cases

CASES = accelerator_cases(FAMILIES + CLASSIFIERS + SEQ2SEQ)


def _skip_unavailable(backend: str) -> None:
    why = backends()[backend]().available()
    if why:
        pytest.skip(why)


def _bundle(bundle_of, family: str):
    return bundle_of(family, FIXED_LEN) if family in SEQ2SEQ else bundle_of(family)


@pytest.mark.parametrize("family,backend", CASES)
def test_gate_on_the_accelerator(bundle_of, checkpoints, family, backend):
    _skip_unavailable(backend)
    fam = families()[family]()
    model = fam.load(checkpoints[family])
    config = fam.model_config(model)
    bundle = _bundle(bundle_of, family)
    # few tokens: the simulated NPU takes milliseconds a step
    if fam.task == "classification":
        res = classifier_gate(fam, model, bundle, backend, None, config)
    elif family in SEQ2SEQ:
        res = seq2seq_gate(fam, model, bundle, backend, None, config, max_new_tokens=16)
    else:
        res = lm_gate(fam, model, bundle, backend, None, config, tokens=48)
    assert res["passed"], res
    assert res["agreement"] >= 0.95, res


@pytest.mark.parametrize("family,backend", CASES)
def test_partition_report(bundle_of, family, backend):
    """The one-token graphs (static once batch, window and cache are fixed) run wholly on the
    accelerator; the report counts every node of every graph once."""
    _skip_unavailable(backend)
    import edgeseq
    from edgeseq.runtime.backends.qnn.run import partition

    sess = edgeseq.load(_bundle(bundle_of, family), backend=backend)
    reports = {g: partition(a) for g, a in sess.model.partition.items()}
    static = ("encoder", "decoder_step") if family in SEQ2SEQ else ("step",)
    for g in static:
        assert reports[g]["npu_share"] == 1.0, (g, reports[g])
    for g, r in reports.items():
        assert r["npu_nodes"] + r["cpu_nodes"] > 0, g
        assert sum(r["cpu_ops"].values()) == r["cpu_nodes"], g
