"""The suite for backends that compute in their own precision (``Backend.exact`` False: the
QNN HTP runs float graphs in fp16): each family's bundle runs there, held to the accuracy gate
against the fp32 reference, and the partition report says what the accelerator took."""
import pytest

from edgeseq.quant.gates import classifier_gate, lm_gate
from edgeseq.registry import backends, families

from ..conftest import CLASSIFIERS, FAMILIES, accelerator_cases

CASES = accelerator_cases(FAMILIES + CLASSIFIERS)


def _skip_unavailable(backend: str) -> None:
    why = backends()[backend]().available()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("family,backend", CASES)
def test_gate_on_the_accelerator(bundle_of, checkpoints, family, backend):
    _skip_unavailable(backend)
    fam = families()[family]()
    model = fam.load(checkpoints[family])
    config = fam.model_config(model)
    if fam.task == "classification":
        res = classifier_gate(fam, model, bundle_of(family), backend, None, config)
    else:
        # 48 tokens: the simulated NPU takes milliseconds a step
        res = lm_gate(fam, model, bundle_of(family), backend, None, config, tokens=48)
    assert res["passed"], res
    assert res["agreement"] >= 0.95, res


@pytest.mark.parametrize("family,backend", CASES)
def test_partition_report(bundle_of, family, backend):
    """The step graph (static once batch is 1) runs wholly on the accelerator; the report
    counts every node of every graph once."""
    _skip_unavailable(backend)
    import edgeseq
    from edgeseq.runtime.backends.qnn.run import partition

    sess = edgeseq.load(bundle_of(family), backend=backend)
    reports = {g: partition(a) for g, a in sess.model.partition.items()}
    assert reports["step"]["npu_share"] == 1.0, reports["step"]
    for g, r in reports.items():
        assert r["npu_nodes"] + r["cpu_nodes"] > 0, g
        assert sum(r["cpu_ops"].values()) == r["cpu_nodes"], g
