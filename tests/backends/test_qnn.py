"""What the QNN backend refuses, and the SoC it compiles for (its runs are in the accelerators'
suite, tests/backends/test_accelerators.py)."""
import pytest

from edgeseq.bundle import BundleError, read_manifest
from edgeseq.devices.catalog import get_profile
from edgeseq.registry import get_backend
from edgeseq.runtime.backends.qnn.run import DEFAULT_SOC, SOCS, soc_for

from ..conftest import FIXED_LEN

needs_qnn = pytest.mark.skipif(get_backend("qnn").available() is not None,
                               reason=str(get_backend("qnn").available()))


def test_every_qualcomm_profile_names_a_soc_qnn_knows():
    """A device profile that prefers QNN names its SoC, and the backend can compile for it."""
    for dev in ("android-sd8gen3", "android-sd7gen3", "snapdragon-x-elite-laptop"):
        prof = get_profile(dev)
        assert any("qnn" in b.lower() for b in prof.backends), dev
        assert prof.soc in SOCS, (dev, prof.soc)


def test_soc_follows_the_target(bundle_of):
    man = read_manifest(bundle_of("s4d"))
    assert man.target == "host" and soc_for(man) == DEFAULT_SOC
    man.target = "snapdragon-x-elite-laptop"
    assert soc_for(man) == "SC8380XP"


@needs_qnn
@pytest.mark.parametrize("family,max_target_len,why", [
    ("t5", FIXED_LEN, "source of any length"),
    ("whisper", None, "--max-target-len"),
])
def test_refuses_shapes_the_htp_cannot_compile(bundle_of, family, max_target_len, why):
    import edgeseq

    with pytest.raises(BundleError, match=why) as err:
        edgeseq.load(bundle_of(family, max_target_len), backend="qnn")
    assert "\n" not in str(err.value)
