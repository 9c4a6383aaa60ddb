import pytest

from edgeseq.registry import UnknownNameError, get_backend, get_family


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown family 'gpt2'; known: bart, lmuformer, mamba, mamba2, marian, s4d, t5, whisper"):
        get_family("gpt2")
    with pytest.raises(UnknownNameError, match="known: executorch, ort, torch"):
        get_backend("tensorrt")


def test_backend_aliases():
    assert get_backend("onnx").name == "ort" and get_backend("pte").name == "executorch"
