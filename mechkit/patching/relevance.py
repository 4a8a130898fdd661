"""Layer-wise relevance rules for the backward pass of RelP (relevance patching).

Inside :func:`relevance_rules` a forward pass computes exactly the same values as before, but its
backward pass follows the LRP rules RelP uses instead of the true gradient:

- **LN rule**: LayerNorm / RMSNorm divide by a scale that is treated as a constant (the centring
  of LayerNorm stays, it is linear);
- **identity rule**: an elementwise nonlinearity ``f`` backpropagates as ``x · (f(x)/x)`` with the
  ratio held constant, i.e. its "derivative" is ``f(x)/x``;
- **half rule**: a gated product ``act(gate) · up`` (SwiGLU) sends half of the signal to each factor;
- **attention**, three choices: ``"gradient"`` (default) leaves attention untouched;
  ``"detach"`` (the AH rule of CP-LRP) holds the attention probabilities constant, so relevance
  flows through the values only and queries and keys receive none; ``"half"`` (AttnLRP's
  treatment) keeps the softmax's gradient and lets the two bilinear products, ``q · kᵀ`` and
  ``A · v``, send half of the signal to each factor (the gradients at ``attn.q``, ``attn.k``,
  ``attn.v`` and ``attn.pattern`` are halved).

Each rule is written as ``y.detach() + (r − r.detach())`` where ``r`` is the linearised form: the
value is the module's own output bit for bit, the gradient is the rule's. The rules are installed by
shadowing the ``forward`` of the model's norm, activation and gated-MLP modules (no parameter is
touched) and always removed on exit. They are defined for the torch_hooks backend on GPT-2 and
LLaMA-family models; other backends and architectures raise a :class:`MechkitError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from mechkit.errors import MechkitError

__all__ = ["ATTENTION_RULES", "RELP_ARCHITECTURES", "relevance_rules"]

RELP_ARCHITECTURES = ("gpt2", "llama")
ATTENTION_RULES = ("detach", "half", "gradient")
_ACTIVATION_NAMES = ("act", "act_fn")
_EPS = 1e-12


def _with_gradient_of(value: Tensor, linear: Tensor) -> Tensor:
    """``value`` forward, the gradient of ``linear`` backward."""
    return value.detach() + (linear - linear.detach())


def _ratio(out: Tensor, x: Tensor) -> Tensor:
    """``out / x``, and 0 where ``x`` is ~0 (there ``x · ratio`` carries no signal either way)."""
    small = x.abs() < _EPS
    return torch.where(small, torch.zeros_like(out), out / torch.where(small, torch.ones_like(x), x))


def _layer_norm_rule(module: nn.LayerNorm, original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def forward(x: Tensor) -> Tensor:
        dims = tuple(range(-len(module.normalized_shape), 0))
        centred = x - x.mean(dim=dims, keepdim=True)
        scale = (x.var(dim=dims, keepdim=True, unbiased=False) + module.eps).sqrt().detach()
        linear = centred / scale
        if module.weight is not None:
            linear = linear * module.weight
        if module.bias is not None:
            linear = linear + module.bias
        return _with_gradient_of(original(x), linear)

    return forward


def _elementwise_rule(original: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """RMSNorm (no bias: y_i = x_i · w_i / s) and activations alike: gradient ``y/x`` elementwise."""

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = original(x, *args, **kwargs)
        if out.shape != x.shape:
            raise MechkitError(f"the relevance rule expected an elementwise module, got shapes {tuple(x.shape)} → "
                               f"{tuple(out.shape)}")
        return _with_gradient_of(out, x * _ratio(out.detach(), x.detach()).to(x.dtype))

    return forward


def _gated_rule(module: nn.Module) -> Callable[..., Tensor]:
    """SwiGLU ``down(act(gate(x)) · up(x))`` with the half rule on the product."""

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        a, u = module.act_fn(module.gate_proj(x)), module.up_proj(x)
        return module.down_proj(0.5 * (a * u.detach()) + 0.5 * (a.detach() * u))

    return forward


def _rule_for(name: str, module: nn.Module) -> Callable[..., Tensor] | None:
    original = module.forward
    if isinstance(module, nn.LayerNorm):
        return _layer_norm_rule(module, original)
    if type(module).__name__.endswith("RMSNorm"):
        if getattr(module, "bias", None) is not None:
            raise MechkitError(f"{name}: an RMSNorm with a bias is not covered by the relevance rules")
        return _elementwise_rule(original)
    if name.rsplit(".", 1)[-1] in _ACTIVATION_NAMES and not any(True for _ in module.parameters()):
        return _elementwise_rule(original)
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return _gated_rule(module)
    return None


def _check_model(model: Any) -> nn.Module:
    if getattr(model, "backend", None) != "torch_hooks":
        raise MechkitError(f"RelP's relevance rules are installed on HF modules and need the torch_hooks backend "
                           f"(this model uses {getattr(model, 'backend', type(model).__name__)!r}); load it with "
                           "mechkit.load(..., backend='torch_hooks'), or use method='atp'")
    arch = model.info.architecture
    if arch not in RELP_ARCHITECTURES:
        raise MechkitError(f"RelP's relevance rules are defined for {', '.join(RELP_ARCHITECTURES)} models, not "
                           f"{arch!r}; use method='atp'")
    return model.torch_module


@contextlib.contextmanager
def relevance_rules(model: Any, *, attention: str = "gradient") -> Iterator[list[str]]:
    """Install the relevance rules on ``model`` (torch_hooks, GPT-2 / LLaMA) for the block.

    Yields the names of the modules whose backward was changed. Forward values are unchanged;
    every shadowed ``forward`` is removed on exit, exceptions included.
    """
    if attention not in ATTENTION_RULES:
        raise MechkitError(f"attention={attention!r}: use 'detach' (probabilities constant), 'half' (bilinear "
                           "products halved) or 'gradient'")
    root = _check_model(model)
    installed: list[tuple[nn.Module, Any]] = []
    names: list[str] = []
    try:
        for name, module in list(root.named_modules()):
            rule = _rule_for(name, module)
            if rule is not None:
                installed.append((module, module.__dict__.get("forward")))
                module.forward = rule  # an instance attribute shadows the class's forward
                names.append(name)
        with contextlib.ExitStack() as stack:
            if attention == "detach":
                stack.enter_context(model.intervene({"blocks.*.attn.pattern": _constant}))
            elif attention == "half":
                kinds = ("attn.q", "attn.k", "attn.v", "attn.pattern")
                stack.enter_context(model.intervene({f"blocks.*.{kind}": _half for kind in kinds}))
            yield names
    finally:
        for module, previous in reversed(installed):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous


def _constant(pattern: Tensor) -> Tensor:
    """The attention probabilities as constants of the backward pass (same values)."""
    return pattern.detach()


def _half(act: Tensor) -> Tensor:
    """The same value with half of the gradient flowing back through it."""
    return 0.5 * act + 0.5 * act.detach()
