"""The one site vocabulary shared by every backend.

A site is an address in a transformer: ``embed``, ``blocks.3.resid_post``, ``blocks.3.attn.z``
(per-head axis), ``blocks.3.attn.z.h2`` (head 2 only), ``blocks.1.moe.topk.e3`` (expert 3 only),
``ln_final``, ``logits``, or ``module:<path>`` for the output of any submodule by path.
``Site.parse(str(site)) == site`` for every site.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mechkit.errors import UnknownSiteError

GLOBAL_KINDS = ("embed", "ln_final", "logits")
# In execution order within a block.
BLOCK_KINDS = (
    "resid_pre",
    "attn.in",
    "attn.q_in",
    "attn.k_in",
    "attn.v_in",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.rot_q",
    "attn.rot_k",
    "attn.z",
    "attn.pattern",
    "attn.out",
    "resid_mid",
    "mlp.in",
    "moe.router",
    "moe.topk",
    "mlp.pre",
    "mlp.post",
    "mlp.out",
    "resid_post",
)
MODULE_KIND = "module"
KINDS = GLOBAL_KINDS + BLOCK_KINDS + (MODULE_KIND,)

# Named axes of the tensor stored at each kind; interventions select along them.
AXES: dict[str, tuple[str, ...]] = {
    "embed": ("batch", "pos", "d_model"),
    "ln_final": ("batch", "pos", "d_model"),
    "logits": ("batch", "pos", "vocab"),
    "resid_pre": ("batch", "pos", "d_model"),
    "resid_mid": ("batch", "pos", "d_model"),
    "resid_post": ("batch", "pos", "d_model"),
    "attn.in": ("batch", "pos", "d_model"),
    "attn.q_in": ("batch", "pos", "head", "d_model"),
    "attn.k_in": ("batch", "pos", "head", "d_model"),
    "attn.v_in": ("batch", "pos", "head", "d_model"),
    "mlp.in": ("batch", "pos", "d_model"),
    "attn.q": ("batch", "pos", "head", "d_head"),
    "attn.k": ("batch", "pos", "head", "d_head"),
    "attn.v": ("batch", "pos", "head", "d_head"),
    "attn.rot_q": ("batch", "pos", "head", "d_head"),
    "attn.rot_k": ("batch", "pos", "head", "d_head"),
    "attn.z": ("batch", "pos", "head", "d_head"),
    "attn.pattern": ("batch", "head", "pos", "key_pos"),
    "attn.out": ("batch", "pos", "d_model"),
    "mlp.pre": ("batch", "pos", "neuron"),
    "mlp.post": ("batch", "pos", "neuron"),
    "mlp.out": ("batch", "pos", "d_model"),
    "moe.router": ("batch", "pos", "expert"),
    "moe.topk": ("batch", "pos", "expert"),
}
KV_HEAD_KINDS = frozenset(("attn.k", "attn.v", "attn.k_in", "attn.v_in", "attn.rot_k"))
"""Head-axis kinds whose heads are the KV heads (fewer than the query heads under grouped-query attention)."""
HEAD_KINDS = frozenset(k for k, axes in AXES.items() if "head" in axes)
EXPERT_KINDS = frozenset(k for k, axes in AXES.items() if "expert" in axes)
MOE_KINDS = frozenset({"moe.router", "moe.topk"})

_BLOCK_RE = re.compile(
    r"^blocks\.(?P<layer>\d+)\.(?P<kind>[a-z_]+(?:\.[a-z_]+)?)(?:\.h(?P<head>\d+)|\.e(?P<expert>\d+))?$"
)
_GLOBAL_RE = re.compile(r"^(?P<kind>embed|ln_final|logits)$")
# ``<host site>.<splice name>.<part>``: an intermediate of a module spliced in at the host site.
_SPLICE_RE = re.compile(r"^(?P<host>.+)\.(?P<splice>[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*)$")
_SPLICE_PART_RE = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")


@dataclass(frozen=True)
class Site:
    """An address in a model. ``head``/``expert`` narrow a site to one slice of its head/expert axis.

    ``splice`` (``"<name>.<part>"``) addresses an intermediate of a module spliced in at the host
    site (see :meth:`mechkit.Model.splice`), e.g. ``blocks.3.resid_post.sae.latents``.
    """

    kind: str
    layer: int | None = None
    head: int | None = None
    expert: int | None = None
    path: str | None = None  # only for kind == "module"
    splice: str | None = None

    def __post_init__(self) -> None:
        if self.splice is not None:
            if not _SPLICE_PART_RE.match(self.splice):
                raise UnknownSiteError(f"a splice part is '<name>.<part>' in lowercase, got {self.splice!r}")
            if self.kind == MODULE_KIND or self.head is not None or self.expert is not None:
                raise UnknownSiteError("splice parts live on a whole named site (not module:, heads or experts)")
        if self.kind not in KINDS:
            raise UnknownSiteError(f"unknown site kind {self.kind!r}; {_nearest(self.kind, KINDS)}")
        if self.kind == MODULE_KIND:
            if not self.path or self.layer is not None or self.head is not None or self.expert is not None:
                raise UnknownSiteError("a module site needs a path and nothing else: 'module:<path>'")
            return
        if self.kind in GLOBAL_KINDS and self.layer is not None:
            raise UnknownSiteError(f"{self.kind!r} has no layer; write it as {self.kind!r}")
        if self.kind in BLOCK_KINDS and (self.layer is None or self.layer < 0):
            raise UnknownSiteError(f"{self.kind!r} needs a layer ≥ 0: 'blocks.<layer>.{self.kind}'")
        if self.head is not None and (self.kind not in HEAD_KINDS or self.head < 0):
            raise UnknownSiteError(
                f"{self.kind!r} has no head axis; heads exist on {sorted(HEAD_KINDS)}"
                if self.kind not in HEAD_KINDS
                else "head index must be ≥ 0"
            )
        if self.expert is not None and (self.kind not in EXPERT_KINDS or self.expert < 0):
            raise UnknownSiteError(
                f"{self.kind!r} has no expert axis; experts exist on {sorted(EXPERT_KINDS)}"
                if self.kind not in EXPERT_KINDS
                else "expert index must be ≥ 0"
            )
        if self.head is not None and self.expert is not None:
            raise UnknownSiteError("a site narrows to a head or to an expert, not both")

    # -- text form -------------------------------------------------------------------------
    @classmethod
    def parse(cls, name: str | Site) -> Site:
        if isinstance(name, Site):
            return name
        if not isinstance(name, str):
            raise TypeError(f"a site is a str or Site, got {type(name).__name__}")
        text = name.strip()
        if text.startswith(MODULE_KIND + ":"):
            return cls(MODULE_KIND, path=text[len(MODULE_KIND) + 1 :])
        if (site := _parse_plain(text)) is not None:
            return site
        if (m := _SPLICE_RE.match(text)) and (host := _parse_plain(m["host"])) is not None and host.base == host:
            return cls(host.kind, host.layer, splice=m["splice"])
        layer = re.match(r"^blocks\.(\d+)\.", text)
        examples = vocabulary_examples(layer=int(layer[1]) if layer else 0)
        raise UnknownSiteError(f"cannot parse site {name!r}; {_nearest(text, examples)}")

    def __str__(self) -> str:
        if self.kind == MODULE_KIND:
            return f"{MODULE_KIND}:{self.path}"
        if self.splice is not None:
            return f"{self.host}.{self.splice}"
        if self.kind in GLOBAL_KINDS:
            return self.kind
        suffix = f".h{self.head}" if self.head is not None else f".e{self.expert}" if self.expert is not None else ""
        return f"blocks.{self.layer}.{self.kind}{suffix}"

    def __repr__(self) -> str:
        return f"Site({str(self)!r})"

    # -- structure -------------------------------------------------------------------------
    @property
    def base(self) -> Site:
        """The site without its head/expert narrowing (a splice part keeps its splice)."""
        if self.head is None and self.expert is None:
            return self
        return Site(self.kind, self.layer)

    @property
    def host(self) -> Site:
        """The model site a splice part hangs off (the site itself when it is not a splice part)."""
        return self if self.splice is None else Site(self.kind, self.layer)

    @property
    def axes(self) -> tuple[str, ...]:
        """Named axes of this site's tensor (a narrowed site loses its head/expert axis).

        A splice part keeps its host's leading axes; its last axis is the spliced module's
        ``feature`` axis (e.g. SAE latents).
        """
        axes = AXES.get(self.kind, ())
        if self.splice is not None:
            return (*axes[:-1], "feature")
        if self.head is not None:
            axes = tuple(a for a in axes if a != "head")
        if self.expert is not None:
            axes = tuple(a for a in axes if a != "expert")
        return axes

    def sort_key(self) -> tuple:
        """Execution order: embed, then blocks in order (kinds in block order), then ln_final, logits."""
        splice = self.splice or ""
        if self.kind == "embed":
            return (-1, 0, splice, -1, -1)
        if self.kind in ("ln_final", "logits"):
            return (10**9, GLOBAL_KINDS.index(self.kind), splice, -1, -1)
        if self.kind == MODULE_KIND:
            return (10**9 + 1, 0, self.path or "", -1, -1)
        return (self.layer, BLOCK_KINDS.index(self.kind), splice, _or(self.head), _or(self.expert))


def _parse_plain(text: str) -> Site | None:
    """A global or block site without a splice part, or None when ``text`` is not one."""
    if m := _GLOBAL_RE.match(text):
        return Site(m["kind"])
    if (m := _BLOCK_RE.match(text)) and m["kind"] in BLOCK_KINDS:
        return Site(
            m["kind"],
            int(m["layer"]),
            head=int(m["head"]) if m["head"] else None,
            expert=int(m["expert"]) if m["expert"] else None,
        )
    return None


def _or(value: int | None) -> int:
    return -1 if value is None else value


def vocabulary_examples(layer: int = 0) -> list[str]:
    """Every site name at one layer, plus the global sites (for 'did you mean' hints)."""
    return ["embed", *(f"blocks.{layer}.{kind}" for kind in BLOCK_KINDS), "ln_final", "logits"]


def _nearest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not close:  # fall back to the names sharing the longest prefix
        close = sorted(candidates, key=lambda c: -len(_common_prefix(c, name)))[:n]
    return "nearest valid names: " + ", ".join(close)


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def nearest_names(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A human-readable hint listing the names in ``candidates`` closest to ``name``."""
    return _nearest(name, candidates, n)


def is_pattern(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def select(specs: str | Site | Sequence[str | Site], available: Sequence[Site]) -> list[Site]:
    """Resolve names and globs (``blocks.*.resid_post``) against the sites a model has.

    Returns sites in execution order without duplicates. Unknown names raise
    :class:`UnknownSiteError` listing the nearest names this model has.
    """
    if isinstance(specs, (str, Site)):
        specs = [specs]
    if not specs:
        raise UnknownSiteError("no sites requested; pass a name such as 'blocks.0.resid_post' or a glob")
    by_name = {str(s): s for s in available}
    chosen: dict[str, Site] = {}
    for spec in specs:
        if isinstance(spec, str) and is_pattern(spec):
            hits = [s for n, s in by_name.items() if fnmatch.fnmatchcase(n, spec)]
            if not hits:
                raise UnknownSiteError(f"pattern {spec!r} matches no site of this model; {_nearest(spec, by_name)}")
            chosen.update((str(h), h) for h in hits)
            continue
        site = Site.parse(spec)
        if site.kind != MODULE_KIND and str(site.base) not in by_name:
            raise UnknownSiteError(f"this model has no site {str(site)!r}; {_nearest(str(site.base), by_name)}")
        chosen[str(site)] = site
    return sorted(chosen.values(), key=Site.sort_key)
