"""The caption options `imgq enqueue` and `imgq explain` share: one definition of each flag, and the
one check of ``--params``' keys (a JSON key is a parameter's field name, not its flag)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from imgq import errors

MaxNewTokens = Annotated[int | None, typer.Option(help="caption: longest caption in tokens (default 30).")]
MinNewTokens = Annotated[int | None, typer.Option(help="caption: shortest caption, in tokens.")]
NumBeams = Annotated[int | None, typer.Option(help="caption: beam search width (1 = greedy).")]
Sample = Annotated[bool, typer.Option("--sample", help="caption: sample instead of greedy/beam search.")]
TopP = Annotated[float | None, typer.Option(help="caption: nucleus sampling mass (with --sample).")]
TopK = Annotated[int | None, typer.Option(help="caption: top-k sampling (with --sample).")]
Temperature = Annotated[float | None, typer.Option(help="caption: sampling temperature (with --sample).")]
RepetitionPenalty = Annotated[float | None, typer.Option(help="caption: penalty for repeated tokens.")]
Seed = Annotated[int | None, typer.Option(help="caption: seed for reproducible sampling.")]
Prompt = Annotated[str | None, typer.Option(help="caption: text the caption continues, e.g. 'a photo of' "
                                            "(at most 512 characters).")]
Resize = Annotated[str | None, typer.Option(help="stretch (model default) | center_crop | letterbox.")]


def given(values: dict[str, Any], fields: Any) -> dict[str, Any]:
    """The caption flags given on the command line (``values``: the command's locals), as
    parameters: those named in ``fields`` that are set, and ``do_sample`` for ``--sample``."""
    raw = {name: value for name, value in values.items()
           if name in fields and name not in ("do_sample", "explain") and value is not None}
    if values.get("do_sample"):
        raw["do_sample"] = True
    return raw


def check_names(raw: dict[str, Any], kinds: list[str]) -> None:
    """Refuse a parameter none of ``kinds`` takes, naming the keys they do take: ``{"sample": true}``
    was reported as `--sample: Extra inputs are not permitted` (a flag that exists) or as `sample
    apply to none of the kinds`, and neither said the key is ``do_sample``."""
    from imgq.kinds import spec

    known = sorted({f for kind in kinds for f in spec(kind).params.model_fields})
    unknown = sorted(set(raw) - set(known))
    if unknown:
        names = ", ".join(repr(u) for u in unknown)
        raise errors.BadParams(f"invalid parameters: {names} {'is' if len(unknown) == 1 else 'are'} not a "
                               f"parameter of {','.join(kinds)}; its --params keys are {', '.join(known)}")
