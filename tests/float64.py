"""Float64 all the way through, for finite-difference tests.

LLaMA-family RMSNorm and eager softmax round-trip through float32, which swamps float64 finite
differences; inside :func:`exact_llama_math` they run the same math in the input dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _eager_in_input_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = (weights if attention_mask is None else weights + attention_mask).softmax(dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@contextlib.contextmanager
def exact_llama_math() -> Iterator[None]:
    from transformers.models.llama import modeling_llama

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
        patch.setattr(modeling_llama, "eager_attention_forward", _eager_in_input_dtype)
        yield
