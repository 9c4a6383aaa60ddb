"""Every registered family and backend is exercised by the shared suites (optimum's
test_all_models_tested): the suites parametrize over the registries, so this pins the lists."""
from edgeseq.registry import backends, families

from .conftest import BACKENDS, CLASSIFIERS, FAMILIES, SEQ2SEQ


def test_registries_are_covered():
    assert set(FAMILIES) | set(SEQ2SEQ) | set(CLASSIFIERS) == set(families())
    assert set(CLASSIFIERS) == {"lmuformer"}
    assert set(FAMILIES) >= {"mamba", "mamba2", "s4d"}
    assert set(SEQ2SEQ) >= {"t5", "bart", "marian", "whisper"}
    assert set(BACKENDS) == set(backends()) == {"ort", "executorch", "torch"}


def test_every_family_can_make_a_test_checkpoint(checkpoints):
    for name in FAMILIES:
        assert (checkpoints[name] / "config.json").is_file()
