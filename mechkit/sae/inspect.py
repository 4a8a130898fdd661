"""Looking at single latents: their top-activating contexts, how often each fires, and which tokens
their decoder directions promote or suppress.

Latents are read by running the model to the SAE's site and encoding the real tokens there (what
``model.splice(site, sae)`` exposes as ``<site>.sae.latents``); padding never enters a top-k or a
count, so batched runs give what prompt-by-prompt runs give. The top-k is kept running per latent
over the stream of batches — memory is ``[latents, k + batch tokens]``, never every activation —
with ties going to the earlier token, as one global sort over all prompts would order them.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mechkit import viz
from mechkit.errors import MechkitError
from mechkit.provenance import provenance
from mechkit.results import Result
from mechkit.sae.compare import encode_rows
from mechkit.sae.directions import decoder_directions, n_latents
from mechkit.sae.functional import firing_frequency
from mechkit.sae.result import plot_frequencies
from mechkit.sae.source import one_site

__all__ = ["FrequencyResult", "LogitEffectsResult", "TopContextsResult", "activation_frequency", "logit_effects",
           "top_contexts"]

SHOWN = 8  # latents rendered by a result's _repr_html_
PROGRESS = 256  # runs over more prompts than this show a progress bar


def _latent_index(sae: Any, latents: Any) -> Tensor:
    d_sae = n_latents(sae)
    index = torch.arange(d_sae) if latents is None else torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    if index.numel() == 0 or index.min() < 0 or index.max() >= d_sae:
        raise MechkitError(f"latents must be indices in [0, {d_sae}), got {index.tolist()}")
    return index


def _latent_batches(model: Any, sae: Any, host: str, prompts: Sequence[Any], batch_size: int,
                    progress: bool) -> Iterator[tuple[int, Any, Tensor]]:
    """Per batch of prompts: its first prompt's index, the batch and the latents of its real tokens
    ``[n_real, d_sae]`` in prompt-then-position order."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise MechkitError("prompts must be a non-empty list of texts or token-id lists (wrap a single text in a list)")
    if batch_size < 1:
        raise MechkitError(f"batch_size={batch_size}: must be at least 1")
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(prompts), batch_size), desc="SAE latents", disable=not progress, leave=False):
        batch = model.to_tokens(list(prompts[start:start + batch_size]))
        _, cache = model.run_with_cache(batch, [host])
        acts = cache[host]
        if acts.ndim != 3 or tuple(acts.shape[:2]) != tuple(batch.input_ids.shape):
            raise MechkitError(f"{host} has shape {tuple(acts.shape)}, not [batch, pos, d]: pick a per-token site")
        yield start, batch, encode_rows(sae, acts[batch.attention_mask.bool()])


def _separator(tokenizer: Any, ids: Tensor) -> str:
    """What goes between shown tokens: a space for tokenizers whose pieces carry none (word-level),
    nothing for those whose pieces carry their own spacing (BPE, SentencePiece)."""
    flat = [int(i) for i in ids.reshape(-1).tolist() if i >= 0][:2]
    if tokenizer is None or len(flat) < 2:
        return " " if tokenizer is None else ""
    joined = tokenizer.decode(flat)
    return "" if joined == tokenizer.decode(flat[:1]) + tokenizer.decode(flat[1:]) else " "


def _decode_tokens(tokenizer: Any, ids: Tensor) -> dict[str, str]:
    """``{str(id): text}`` for the distinct ids shown (``str(id)`` itself without a tokenizer)."""
    unique = sorted({int(i) for i in ids.reshape(-1).tolist() if i >= 0})
    if tokenizer is None:
        return {str(i): str(i) for i in unique}
    return {str(i): tokenizer.decode([i]) for i in unique}


@dataclass
class _RunningTop:
    """The k largest activations per latent seen so far, with their contexts."""

    index: Tensor
    k: int
    before: int
    after: int

    def __post_init__(self) -> None:
        n, w = self.index.numel(), self.before + self.after + 1
        self.values = torch.full((n, self.k), float("-inf"))
        self.prompt = torch.full((n, self.k), -1, dtype=torch.long)
        self.position = torch.full((n, self.k), -1, dtype=torch.long)
        self.ids = torch.full((n, self.k, w), -1, dtype=torch.long)
        self.acts = torch.zeros(n, self.k, w)
        self.fired = torch.zeros(n, dtype=torch.float64)
        self.tokens = 0

    def add(self, start: int, batch: Any, z: Tensor) -> None:
        mask = batch.attention_mask.bool()
        b, t = mask.nonzero(as_tuple=True)  # row-major: prompt order, then position order
        z = z[:, self.index]  # [n_real, L]
        self.fired += (z > 0).sum(0).double()
        self.tokens += z.shape[0]
        fresh = torch.where(z > 0, z, torch.full_like(z, float("-inf"))).T  # only firing tokens can rank
        # earlier entries first, then this batch in order: a stable sort sends ties to the earlier token
        candidates = torch.cat([self.values, fresh], 1)
        order = candidates.argsort(dim=1, descending=True, stable=True)[:, :self.k]
        new = order >= self.k
        src = (order - self.k).clamp_min(0)
        values = candidates.gather(1, order)
        found = values > float("-inf")
        self.prompt = torch.where(new, b[src] + start, self.prompt.gather(1, order.clamp_max(self.k - 1)))
        self.position = torch.where(new, t[src], self.position.gather(1, order.clamp_max(self.k - 1)))
        self.prompt[~found], self.position[~found] = -1, -1
        ids, acts = self._windows(batch, z, mask, b[src], t[src])
        old = order.clamp_max(self.k - 1).unsqueeze(-1).expand(-1, -1, ids.shape[-1])
        keep_new = (new & found).unsqueeze(-1)
        self.ids = torch.where(keep_new, ids, self.ids.gather(1, old))
        self.acts = torch.where(keep_new, acts, self.acts.gather(1, old))
        self.ids[~found], self.acts[~found] = -1, 0.0
        self.values = values

    def _windows(self, batch: Any, z: Tensor, mask: Tensor, b: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and this latent's activations in the window around each candidate ``(b, t)`` [L, k]."""
        pos = t.unsqueeze(-1) + torch.arange(-self.before, self.after + 1)  # [L, k, W]
        rows = b.unsqueeze(-1).expand_as(pos)
        lengths = mask.sum(1)
        valid = (pos >= 0) & (pos < lengths[rows])
        clamped = pos.clamp(0, mask.shape[1] - 1)
        ids = torch.where(valid, batch.input_ids[rows, clamped], torch.full_like(pos, -1))
        # the flat row of each (prompt, position) among the batch's real tokens
        flat = torch.full(mask.shape, -1, dtype=torch.long)
        flat[mask] = torch.arange(int(mask.sum()))
        latent = torch.arange(z.shape[1]).view(-1, 1, 1).expand_as(pos)
        acts = torch.where(valid, z[flat[rows, clamped].clamp_min(0), latent], torch.zeros(pos.shape))
        return ids, acts


def top_contexts(model: Any, sae: Any, site: str, prompts: Sequence[Any], *, latents: Any = None, k: int = 10,
                 batch_size: int = 16, window: int | tuple[int, int] = (10, 4)) -> TopContextsResult:
    """The ``k`` real tokens on which each latent fires most strongly over ``prompts``, with contexts.

    ``latents``: indices to follow (all when None); ``window``: tokens shown before and after the top
    token (an int for both). Only tokens where the latent fires (activation > 0) rank, so a latent
    that fires on fewer than ``k`` tokens has fewer entries (the rest are marked with prompt −1).
    """
    before, after = (window, window) if isinstance(window, int) else tuple(window)
    if k < 1 or before < 0 or after < 0:
        raise MechkitError(f"k={k}, window={window}: k must be at least 1 and the window non-negative")
    host = str(one_site(model, site))
    running = _RunningTop(_latent_index(sae, latents), k, int(before), int(after))
    for start, batch, z in _latent_batches(model, sae, host, prompts, batch_size, progress=len(prompts) > PROGRESS):
        running.add(start, batch, z)
    return TopContextsResult(
        site=host, latents=running.index, activations=running.values, prompt_index=running.prompt,
        position=running.position, context_ids=running.ids, context_activations=running.acts,
        window=(running.before, running.after), tokens=_decode_tokens(model.tokenizer, running.ids),
        separator=_separator(model.tokenizer, running.ids),
        frequency=(running.fired / max(running.tokens, 1)).float(), n_tokens=running.tokens,
        config={"k": k, "batch_size": batch_size, "window": [running.before, running.after]},
        provenance=provenance(model, [host]),
    )


def activation_frequency(model: Any, sae: Any, site: str, prompts: Sequence[Any], *,
                         batch_size: int = 16) -> FrequencyResult:
    """How often each latent fires (activation > 0) over the real tokens of ``prompts``."""
    host = str(one_site(model, site))
    counted = {"tokens": 0}

    def stream() -> Iterator[Tensor]:
        for _, _, z in _latent_batches(model, sae, host, prompts, batch_size, progress=len(prompts) > PROGRESS):
            counted["tokens"] += z.shape[0]
            yield z

    frequency = firing_frequency(stream())
    return FrequencyResult(site=host, frequency=frequency.float(), n_tokens=counted["tokens"],
                           config={"batch_size": batch_size}, provenance=provenance(model, [host]))


def unembedding(model: Any) -> Tensor:
    """The model's unembedding matrix ``[vocab, d_model]`` (HF output embeddings, or TransformerLens ``W_U``)."""
    module = model.torch_module
    for candidate in (module, getattr(module, "original_model", None), getattr(module, "_model", None)):
        get = getattr(candidate, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is not None and isinstance(getattr(head, "weight", None), Tensor):
            return head.weight.detach()
    w_u = getattr(module, "W_U", None)
    if isinstance(w_u, Tensor):
        return w_u.detach().T
    raise MechkitError(f"cannot find the unembedding of {model.info.name} ({type(module).__name__}): it has neither "
                       "get_output_embeddings() nor W_U")


def logit_effects(model: Any, sae: Any, latents: Any = None, k: int = 10) -> LogitEffectsResult:
    """Per latent, the ``k`` tokens its decoder direction raises most and lowers most: ``W_U · d_i``.

    ``d_i`` is the direction the SAE writes per unit of latent ``i`` (``W_dec[i]``, read through
    ``decode``). The final norm is skipped, as in METHODS §2 (W_U · W_dec[i]): this is the direct,
    linear effect on the logits, not the logit lens of the direction (a LayerNorm would centre and
    rescale it per token). Meaningful for SAEs on the residual stream or on a block's output.
    """
    index = _latent_index(sae, latents)
    directions = decoder_directions(sae, index).float()
    w_u = unembedding(model).float()
    if w_u.shape[1] != directions.shape[1]:
        raise MechkitError(f"the SAE writes {directions.shape[1]}-d directions but the unembedding reads "
                           f"{w_u.shape[1]}-d vectors: logit effects need an SAE on a d_model site")
    k = min(int(k), w_u.shape[0])
    if k < 1:
        raise MechkitError("k must be at least 1")
    effects = directions @ w_u.T  # [L, vocab]
    top, bottom = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
    return LogitEffectsResult(
        latents=index, top_ids=top.indices, top_values=top.values, bottom_ids=bottom.indices,
        bottom_values=bottom.values, tokens=_decode_tokens(model.tokenizer, torch.cat([top.indices, bottom.indices])),
        config={"k": k, "final_norm": False}, provenance=provenance(model),
    )


def _row(latents: Tensor, latent: int) -> int:
    hits = (latents == int(latent)).nonzero()
    if hits.numel() == 0:
        raise MechkitError(f"latent {latent} is not in this result; it holds {latents.tolist()[:20]}…")
    return int(hits[0, 0])


def _span(text: str, value: float, scale: float, bold: bool) -> str:
    alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, value / scale))
    shown = html.escape(text.replace("\n", "⏎"))
    weight = "font-weight:bold;text-decoration:underline;" if bold else ""
    return (f'<span title="{value:.4g}" style="background:rgba(255,120,0,{alpha:.3f});white-space:pre;'
            f'{weight}">{shown}</span>')


@dataclass(frozen=True, eq=False)
class TopContextsResult(Result):
    """Top-activating real tokens per latent (rows follow ``latents``; ``k`` columns, best first).

    ``activations`` / ``prompt_index`` / ``position``: the top activations and where they are (position
    among the prompt's real tokens; −inf / −1 where a latent fired on fewer than k tokens);
    ``context_ids`` / ``context_activations`` ``[L, k, before + 1 + after]``: the window around each
    (id −1 beyond the prompt), the top token at index ``before``; ``tokens``: ``{str(id): text}``;
    ``frequency``: firing frequency of each latent over the ``n_tokens`` real tokens seen;
    ``separator``: put between shown tokens (a space for word-level tokenizers).
    """

    site: str
    latents: Tensor
    activations: Tensor
    prompt_index: Tensor
    position: Tensor
    context_ids: Tensor
    context_activations: Tensor
    window: tuple[int, int]
    tokens: dict[str, str]
    frequency: Tensor
    n_tokens: int
    separator: str = ""

    def _text(self, token_id: int) -> str:
        return self.tokens.get(str(token_id), str(token_id))

    def to_frame(self) -> Any:
        import pandas as pd

        rows = []
        for r, latent in enumerate(self.latents.tolist()):
            for j in range(self.activations.shape[1]):
                if self.prompt_index[r, j] < 0:
                    continue
                ids = self.context_ids[r, j].tolist()
                text = self.separator.join(f"[[{self._text(i)}]]" if w == self.window[0] else self._text(i)
                               for w, i in enumerate(ids) if i >= 0)
                rows.append({"latent": latent, "rank": j, "prompt": int(self.prompt_index[r, j]),
                             "position": int(self.position[r, j]), "activation": float(self.activations[r, j]),
                             "token": self._text(int(self.context_ids[r, j, self.window[0]])), "context": text})
        return pd.DataFrame(rows, columns=["latent", "rank", "prompt", "position", "activation", "token", "context"])

    def html(self, latent: int) -> str:
        """The contexts of one latent as HTML: background intensity ∝ activation / the latent's maximum,
        the top token underlined, the value in each token's tooltip."""
        r = _row(self.latents, latent)
        scale = float(self.activations[r, 0]) if self.prompt_index[r, 0] >= 0 else 0.0
        head = (f"<div><b>latent {int(latent)}</b> at {html.escape(self.site)} — fires on "
                f"{float(self.frequency[r]):.3%} of {self.n_tokens:,} tokens; max {scale:.4g}</div>")
        lines = []
        for j in range(self.activations.shape[1]):
            if self.prompt_index[r, j] < 0:
                continue
            spans = html.escape(self.separator).join(_span(self._text(i), float(a), scale, w == self.window[0])
                            for w, (i, a) in enumerate(zip(self.context_ids[r, j].tolist(),
                                                           self.context_activations[r, j].tolist())) if i >= 0)
            lines.append(f'<div><span style="color:gray">{float(self.activations[r, j]):8.3f} '
                         f'(prompt {int(self.prompt_index[r, j])})</span> {spans}</div>')
        body = "".join(lines) or "<div><i>never fires on these prompts</i></div>"
        return f'<div style="font-family:monospace;line-height:1.6;margin-bottom:0.8em">{head}{body}</div>'

    def _repr_html_(self) -> str:
        shown = self.latents.tolist()[:SHOWN]
        more = len(self.latents) - len(shown)
        note = f"<div><i>… {more} more latents: call .html(latent)</i></div>" if more > 0 else ""
        return "".join(self.html(i) for i in shown) + note


@dataclass(frozen=True, eq=False)
class FrequencyResult(Result):
    """Firing frequency (activation > 0) of every latent, ``[d_sae]``, over ``n_tokens`` real tokens."""

    site: str
    frequency: Tensor
    n_tokens: int

    @property
    def dead_fraction(self) -> float:
        return float((self.frequency == 0).double().mean())

    def to_frame(self) -> Any:
        import pandas as pd

        freq = self.frequency.double()
        return pd.DataFrame({"latent": range(freq.numel()), "frequency": freq.tolist(),
                             "log10_frequency": torch.where(freq > 0, freq.log10(), float("-inf")).tolist(),
                             "dead": (freq == 0).tolist()})

    def _plot(self, fig: Any, bins: int = 40) -> None:
        plot_frequencies(fig.add_subplot(), self.frequency, bins=bins, window=self.n_tokens)


@dataclass(frozen=True, eq=False)
class LogitEffectsResult(Result):
    """Per latent (rows follow ``latents``), the ``k`` tokens ``W_U · d_i`` raises most (``top_*``, largest
    first) and lowers most (``bottom_*``, most negative first); ``tokens``: ``{str(id): text}``."""

    latents: Tensor
    top_ids: Tensor
    top_values: Tensor
    bottom_ids: Tensor
    bottom_values: Tensor
    tokens: dict[str, str]

    def to_frame(self) -> Any:
        import pandas as pd

        rows = []
        for r, latent in enumerate(self.latents.tolist()):
            for side, ids, values in (("top", self.top_ids, self.top_values),
                                      ("bottom", self.bottom_ids, self.bottom_values)):
                for j, (i, v) in enumerate(zip(ids[r].tolist(), values[r].tolist())):
                    rows.append({"latent": latent, "side": side, "rank": j, "token_id": i,
                                 "token": self.tokens.get(str(i), str(i)), "logit_effect": v})
        return pd.DataFrame(rows)

    def _plot(self, fig: Any, latent: int | None = None) -> None:
        r = 0 if latent is None else _row(self.latents, latent)
        ids = self.bottom_ids[r].flip(0).tolist() + self.top_ids[r].flip(0).tolist()
        values = self.bottom_values[r].flip(0).tolist() + self.top_values[r].flip(0).tolist()
        fig.set_size_inches(5, 0.22 * len(ids) + 1.2)
        ax = fig.add_subplot()
        ax.barh(range(len(ids)), values, color=["C3" if v < 0 else "C0" for v in values])
        ax.set_yticks(range(len(ids)), [repr(self.tokens.get(str(i), str(i))) for i in ids], fontsize="small")
        viz.label(ax, x="W_U · decoder direction", title=f"Logit effects of latent {int(self.latents[r])}")
