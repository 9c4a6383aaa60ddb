"""Fused kernels for the hot operators of edgeseq's streaming graphs.

Each kernel is written in Triton (compiled on a CUDA GPU, run by Triton's interpreter on a CPU
for the tests: ``triton_env``) and has a plain PyTorch twin, ``<name>_ref``, that the tests hold
it to; each twin is in turn checked against the maths the family's graphs run.

- ``selective_scan``: Mamba's selective scan over a chunk (a decoding step is a chunk of one),
  optionally returning every position's state (the speculative ``verify`` graph's traces);
- ``ssd_scan``: Mamba-2's scan (a scalar decay per head);
- ``lmu_memory``: the LMU memory update over a chunk of frames;
- ``decode_attention``: split-K attention of one query against a long key/value cache.

docs/kernels.md says what runs where and what is not wired yet.
"""
