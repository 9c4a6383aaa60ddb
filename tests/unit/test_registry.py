import pytest

from edgeseq.registry import UnknownNameError, get_backend, get_family


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UnknownNameError, match="unknown family 'gpt2'; known: bart, lmuformer, mamba, mamba2, marian, s4d, t5, whisper"):
        get_family("gpt2")
    # the example backend of tests/backends/example/ is registered in the test process
    with pytest.raises(UnknownNameError, match="known: example, executorch, openvino, ort, qnn, torch$"):
        get_backend("tensorrt")


def test_backend_aliases():
    assert get_backend("onnx").name == "ort" and get_backend("pte").name == "executorch"


def test_the_backend_format_map_is_written_once():
    """Each backend class declares its format and aliases; every other module asks the registry
    (#24: the map was written out seven times). A literal pairing of a backend name with a
    format anywhere else in the sources fails this test."""
    import re
    from pathlib import Path

    from edgeseq.registry import backend_name, backends, format_of, formats

    fmts = formats()
    # backends that run the files another backend lowers: the example (onnx's reference
    # evaluator) and QNN (ONNX Runtime's QNN provider)
    RUN_ONNX_FILES = {"example", "qnn"}
    assert fmts == {"onnx": "ort", "pte": "executorch", "openvino": "openvino", "pt2": "torch"}
    for name, cls in backends().items():
        # a format names the backend that lowers it, the first registered for it (the example
        # backend runs the ONNX files ORT lowers)
        assert format_of(name) == cls.format and backend_name(cls.format) == fmts[cls.format]
        assert (backend_name(cls.format) == name) == (name not in RUN_ONNX_FILES)
        for alias in cls.aliases:
            assert backend_name(alias) == name
    names = "|".join(fmts.values())
    kinds = "|".join(fmts)
    pair = re.compile(rf"""["']({names})["']\s*:\s*["']({kinds})["']|["']({kinds})["']\s*:\s*["']({names})["']""")
    root = Path(__file__).resolve().parents[2]
    found = [f"{p.relative_to(root)}:{i}" for folder in ("edgeseq", "convert", "runtime", "quant",
                                                          "kernels", "benchmarks", "tests")
             for p in (root / folder).rglob("*.py") if p.resolve() != Path(__file__).resolve()
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if pair.search(line) and "registry.py" not in p.name]
    assert found == [], found
