"""Transcoders in the model: a module that reads one site and writes another (e.g. an MLP's input
→ its output), through sae-lens's ``Transcoder`` / ``SkipTranscoder`` or anything with ``encode`` and
``decode`` from the source width to the target width.

Inside ``with splice_transcoder(model, tc, "blocks.1.mlp.in", "blocks.1.mlp.out") as handle:`` every
run replaces the target site with the transcoder's output computed from the source site of that same
run (``keep_error=True`` adds back target − output, so the run is unchanged until a latent is edited).
``handle.latents`` holds the latents of the last run; ``edit`` (latents → latents) ablates, clamps or
steers them. sae-lens 6.54 trains no transcoders, so they come from a pretrained folder
(:func:`mechkit.sae.load_sae`) or another trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from mechkit.errors import MechkitError

__all__ = ["TranscoderSplice", "splice_transcoder"]


@dataclass(eq=False)
class TranscoderSplice:
    """The live state of a spliced transcoder: the source value and latents of the last run."""

    transcoder: Any
    keep_error: bool
    edit: Callable[[Tensor], Tensor] | None
    source_value: Tensor | None = None
    latents: Tensor | None = None

    def read(self, act: Tensor) -> Tensor:
        self.source_value = act
        return act

    def write(self, act: Tensor) -> Tensor:
        if self.source_value is None:
            raise MechkitError("the transcoder's target site ran before its source site; the source must come first")
        latents = self.transcoder.encode(self.source_value)
        out = self._output(self.source_value, latents)
        self.latents = latents.detach()
        if self.edit is not None:
            edited = self.edit(latents)
            out = out + (self.transcoder.decode(edited) - self.transcoder.decode(latents))
        if out.shape != act.shape:
            raise MechkitError(f"the transcoder writes shape {tuple(out.shape)} but the target site has "
                               f"{tuple(act.shape)}; check d_out against the target site's width")
        out = out + (act - out).detach() if self.keep_error else out
        self.source_value = None
        return out.to(act.dtype)

    def _output(self, x: Tensor, latents: Tensor) -> Tensor:
        out = self.transcoder.decode(latents)
        skip = getattr(self.transcoder, "W_skip", None)  # SkipTranscoder: a linear path beside the latents
        return out + x @ skip.T.to(x.dtype) if isinstance(skip, Tensor) else out


@contextlib.contextmanager
def splice_transcoder(model: Any, transcoder: Any, source: str, target: str, *, keep_error: bool = False,
                      edit: Callable[[Tensor], Tensor] | None = None) -> Iterator[TranscoderSplice]:
    """Run ``model`` with ``target`` replaced by ``transcoder`` applied to ``source`` (see the module doc)."""
    if not (callable(getattr(transcoder, "encode", None)) and callable(getattr(transcoder, "decode", None))):
        raise MechkitError(f"a transcoder needs encode and decode; got a {type(transcoder).__name__}")
    src, dst = model.resolve(source), model.resolve(target)
    if len(src) != 1 or len(dst) != 1:
        raise MechkitError(f"splice_transcoder reads one site and writes one site; {source!r} names {len(src)}, "
                           f"{target!r} names {len(dst)}")
    handle = TranscoderSplice(transcoder, keep_error, edit)
    with model.intervene({src[0]: handle.read, dst[0]: handle.write}):
        yield handle
