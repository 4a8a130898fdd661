"""Evaluating an SAE in its model: reconstruction, latent usage, CE-loss recovered and KL.

Per batch of prompts: the clean run (caching the site), the run with the site replaced by the SAE's
reconstruction of it — the same as splicing the SAE in with ``keep_error=False``, since nothing
upstream changes — and the zero-ablated run; then one more pass with the site set to its mean over
every evaluated token of the set (the mean-ablation baseline, METHODS §2). Every figure counts real
tokens only: next-token cross-entropy is taken on predictions whose target is real, KL at every real
position, reconstruction sums over real positions — so padded batches give what prompt-by-prompt
runs give. ``skip_first`` leaves each prompt's first real tokens unreconstructed and uncounted
(LLaMA-family attention-sink tokens carry norms ~100× the rest, and SAEs are usually trained
without them). Sums are float64 over the whole set (FVU uses the set's mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mechkit.config import Config, ConfigError, option
from mechkit.errors import MechkitError
from mechkit.interventions import Mean, Replace, Zero
from mechkit.provenance import provenance
from mechkit.sae.directions import n_latents
from mechkit.sae.functional import ce_loss_recovered, kl_divergence
from mechkit.sae.result import SAEEvalResult
from mechkit.sae.source import one_site

__all__ = ["EvalConfig", "evaluate_sae", "next_token_loss"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Config):
    """How an SAE is evaluated in its model (the keywords of :func:`evaluate_sae`)."""

    batch_size: int = option(16, help="prompts per forward pass")
    dead_window: int = option(1_000_000, help="tokens over which a latent that never fires counts as dead "
                                              "(the whole evaluation set when it is smaller)")
    dense_threshold: float = option(0.1, help="a latent active on more than this fraction of tokens is dense")
    skip_first: int = option(0, help="first real tokens of each prompt left as they are and not counted "
                                     "(attention-sink positions)")
    progress: bool = option(True, help="show a progress bar")

    def check(self) -> None:
        if self.batch_size < 1 or self.dead_window < 1 or self.skip_first < 0:
            raise ConfigError("batch_size and dead_window must be at least 1, skip_first at least 0")
        if not 0 < self.dense_threshold < 1:
            raise ConfigError(f"dense_threshold={self.dense_threshold}: must be in (0, 1)")


def next_token_loss(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over predictions whose target is a real token, and their count."""
    target_real = mask[:, 1:].bool()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:],
                                               reduction="none")
    return float(losses[target_real].double().sum()), int(target_real.sum())


@dataclass
class _Totals:
    """Running float64 sums over real tokens."""

    d_sae: int
    ce: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("clean", "sae", "zero", "mean"), 0.0))
    predictions: int = 0
    tokens: int = 0
    kl: float = 0.0
    kl_positions: int = 0
    x_sum: Tensor | None = None
    x_sq: float = 0.0
    err_sq: float = 0.0
    cos: float = 0.0
    active: float = 0.0
    fired: Tensor | None = None
    window_tokens: int = 0

    def add_reconstruction(self, x: Tensor, latents: Tensor, recon: Tensor, window: int) -> None:
        x, recon = x.double(), recon.double()
        self.x_sum = x.sum(0) if self.x_sum is None else self.x_sum + x.sum(0)
        self.x_sq += float(x.square().sum())
        self.err_sq += float((x - recon).square().sum())
        self.cos += float(torch.nn.functional.cosine_similarity(x, recon, dim=-1, eps=1e-12).sum())
        on = latents != 0
        self.active += float(on.sum())
        self.tokens += x.shape[0]
        room = max(0, window - self.window_tokens)
        if self.fired is None:
            self.fired = torch.zeros(self.d_sae, dtype=torch.float64)
        if room:
            self.fired += on[:room].sum(0).double()
            self.window_tokens += min(room, x.shape[0])


def evaluate_sae(model: Any, sae: Any, site: str, prompts: Sequence[str], config: EvalConfig | None = None,
                 **options: Any) -> SAEEvalResult:
    """Evaluate ``sae`` at ``site`` of ``model`` on ``prompts`` (settings: :class:`EvalConfig`)."""
    cfg = EvalConfig.from_dict(options) if config is None else config.replace(**options)
    prompts = list(prompts)
    if not prompts:
        raise MechkitError("no prompts to evaluate the SAE on")
    host = str(one_site(model, site))
    totals = _Totals(n_latents(sae))
    batches = [model.tokenize(prompts[i:i + cfg.batch_size]) for i in range(0, len(prompts), cfg.batch_size)]
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc="SAE eval", disable=not cfg.progress, leave=False):
        _first_pass(model, sae, host, batch, totals, cfg)
    if totals.tokens == 0:
        raise MechkitError(f"no tokens left to evaluate: every prompt has at most skip_first={cfg.skip_first} tokens")
    if totals.predictions == 0:
        raise MechkitError("the prompts have no next-token predictions (every prompt is one token long)")
    mean = (totals.x_sum / totals.tokens).to(torch.float32)
    for batch in tqdm(batches, desc="SAE eval (mean ablation)", disable=not cfg.progress, leave=False):
        positions = _evaluated(batch, cfg.skip_first)
        logits, _ = model.run_with_interventions(batch, {host: Mean(value=mean, positions=positions)})
        totals.ce["mean"] += next_token_loss(logits, batch.input_ids, batch.attention_mask)[0]
    return _result(model, sae, host, totals, cfg)


def _evaluated(batch: Any, skip_first: int) -> Tensor:
    """``[batch, pos]``: the real tokens that are reconstructed and counted."""
    real = batch.attention_mask.bool()
    return real & (torch.arange(real.shape[1]) >= skip_first)


def _first_pass(model: Any, sae: Any, host: str, batch: Any, totals: _Totals, cfg: EvalConfig) -> None:
    keep = _evaluated(batch, cfg.skip_first)
    if not keep.any():
        return
    clean, cache = model.run_with_cache(batch, [host])
    x = cache[host]
    with torch.no_grad():
        latents = sae.encode(x)
        recon = sae.decode(latents).to(x.dtype)
    spliced, _ = model.run_with_interventions(batch, {host: Replace(source=recon, positions=keep)})
    zero, _ = model.run_with_interventions(batch, {host: Zero(positions=keep)})
    for name, logits in (("clean", clean), ("sae", spliced), ("zero", zero)):
        loss, count = next_token_loss(logits, batch.input_ids, batch.attention_mask)
        totals.ce[name] += loss
    totals.predictions += count
    real = batch.attention_mask.bool()
    totals.kl += kl_divergence(clean, spliced, real) * int(real.sum())
    totals.kl_positions += int(real.sum())
    totals.add_reconstruction(x[keep], latents[keep], recon[keep], cfg.dead_window)


def _result(model: Any, sae: Any, host: str, t: _Totals, cfg: EvalConfig) -> SAEEvalResult:
    ce = {k: v / t.predictions for k, v in t.ce.items()}
    variance = t.x_sq - float(t.x_sum.square().sum()) / t.tokens
    if variance <= 0:
        raise MechkitError("the site's activations have zero variance on these prompts: FVU is undefined")
    frequency = t.fired / t.window_tokens
    return SAEEvalResult(
        site=host, n_tokens=t.tokens, n_predictions=t.predictions, l0=t.active / t.tokens,
        fvu=t.err_sq / variance, cosine=t.cos / t.tokens,
        dead_fraction=float((frequency == 0).double().mean()),
        dense_fraction=float((frequency > cfg.dense_threshold).double().mean()),
        dead_window=t.window_tokens, ce_clean=ce["clean"], ce_sae=ce["sae"], ce_zero=ce["zero"], ce_mean=ce["mean"],
        recovered_zero=ce_loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
        recovered_mean=ce_loss_recovered(ce["clean"], ce["sae"], ce["mean"]),
        kl=t.kl / t.kl_positions, firing_frequency=frequency.float(),
        config=cfg.to_dict(), provenance=provenance(model, [host]),
    )

