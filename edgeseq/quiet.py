"""Keep third-party chatter (deprecation notices, optional-kernel probes) out of user output."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    for cat in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
    for name in ("torch", "torchao", "transformers", "onnxscript", "executorch",
                 "torch.onnx", "torch._export", "torch.export", "torch.utils._pytree",
                 "torch.onnx._internal.exporter._registration", "torchao.kernel"):
        logging.getLogger(name).setLevel(logging.ERROR)
