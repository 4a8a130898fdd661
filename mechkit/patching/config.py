"""The settings of an activation-patching sweep: the keywords of :func:`activation_patching`, the
options of ``mechkit patch`` and the ``activation`` step of a patching experiment's YAML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from mechkit.config import Config, ConfigError, option

Positions = Union[Literal["each", "last", "all"], tuple[int, ...]]
Neurons = Union[Literal["all"], tuple[int, ...]]


@dataclass(frozen=True, kw_only=True)
class PatchConfig(Config):
    """What an activation-patching sweep patches, how it scores a patch and how it batches the runs."""

    sites: str = option("blocks.*.resid_pre", help="sites to patch (a glob or a comma-separated list): residual-type "
                        "sites (resid_pre/mid/post, attn.out, mlp.out, ...), attn.z (or q/k/v) for heads, mlp.post "
                        "(or mlp.pre) for neurons")
    positions: Positions = option("each", help="'each' real position on its own, 'last' real token, 'all' real "
                                  "tokens at once, or a list of ints counted among real tokens (negative: from "
                                  "each prompt's last token)")
    align: Literal["start", "end"] = option("start", help="how 'each' lines up prompts of different lengths: "
                                            "'start' (cell p is each prompt's p-th real token) or 'end' (cell -k "
                                            "is its k-th token from the end)")
    heads: bool = option(True, help="patch each head of a head-axis site (attn.q/k/v/z) on its own; false patches "
                         "the whole site")
    neurons: Neurons | None = option(None, help="neurons of mlp.pre/mlp.post sites to patch one at a time ('all' "
                                     "or a list); none patches the whole site")
    metric: str = option("logit_diff", help="per-prompt metric: logit_diff, logprob, prob or accuracy (a function "
                         "metric(logits, pairs) -> [batch] may be passed as metric= in Python)")
    direction: Literal["denoise", "noise"] = option("denoise", help="'denoise' patches clean activations into "
                                                    "the corrupt run, 'noise' corrupt activations into the clean run")
    normalized: bool = option(True, help="report recovery of the prompt-mean metric (0: unpatched, 1: fully "
                              "restored); false reports the raw patched metric")
    memory_mb: float = option(256.0, help="estimated activation memory one forward may use; sets how many patched "
                              "variants share a forward")
    variants_per_forward: int | None = option(None, help="patched variants stacked in one forward (each variant "
                                              "is one batch row per prompt); overrides memory_mb")
    skip_unchanged: bool = option(True, help="do not run patches that would write the value a site already "
                                  "has (e.g. positions before the first token where clean and corrupt differ); "
                                  "their score is the unpatched metric")
    progress: bool = option(False, help="show a progress bar over the forward passes")

    def check(self) -> None:
        if not [s for s in self.sites.split(",") if s.strip()]:
            raise ConfigError("sites is empty: name the sites to patch, e.g. 'blocks.*.resid_pre' or "
                              "'blocks.*.attn.z'")
        if isinstance(self.positions, tuple) and not self.positions:
            raise ConfigError("positions=[] selects nothing: pass 'each', 'last', 'all' or some positions")
        if isinstance(self.neurons, tuple) and not self.neurons:
            raise ConfigError("neurons=[] selects nothing: pass 'all', some neuron indices, or none")
        if self.memory_mb <= 0:
            raise ConfigError(f"memory_mb={self.memory_mb}: must be positive")
        if self.variants_per_forward is not None and self.variants_per_forward < 1:
            raise ConfigError(f"variants_per_forward={self.variants_per_forward}: use at least 1")

    @property
    def site_list(self) -> list[str]:
        return [s.strip() for s in self.sites.split(",") if s.strip()]


__all__ = ["PatchConfig"]
