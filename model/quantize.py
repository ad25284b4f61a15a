"""Optional int8 serving: dynamic quantization of the LSTM and output layers.

torch.ao.quantization.quantize_dynamic stores weights as int8 and quantizes activations on the
fly. It still works on nn.LSTM in torch 2.13 but is deprecated upstream, so fp32 stays the
default; the model cards report what int8 changes (speed, validation bits/char).
"""

from __future__ import annotations

import copy
import hashlib
import warnings

import torch
from torch import nn

from .checkpoint import LanguageModel


def quantize_int8(lm: LanguageModel) -> LanguageModel:
    """A copy of `lm` whose LSTM and Linear layers hold int8 weights. Its fingerprint differs:
    its states are numerically different, so sessions must not cross between the two."""
    model = copy.deepcopy(lm.model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see the module docstring
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    fingerprint = hashlib.sha256(f"{lm.fingerprint}:int8".encode()).hexdigest()[:16]
    meta = {**lm.meta, "quantized": "int8"}
    return LanguageModel(quantized, lm.tokenizer, lm.config, fingerprint, lm.path, meta, lm.chat_template)


def is_quantized(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
