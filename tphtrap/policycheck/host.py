"""Checks of ``host``: what the steering tags and neutral tags say together."""

from __future__ import annotations

from ..policy import format_tag
from ..policyread import WIDTH_WORDS
from ..spec import TagWidth
from .context import Context
from .registry import check


@check("neutral-tag-owned", "a neutral tag that the firmware also reports for a CPU")
def neutral_tags_owned(ctx: Context) -> None:
    if not ctx.draft.host_ok:
        return
    for tag, node in ctx.draft.neutral:
        for width in TagWidth:
            owners = ctx.host.owners(width).get(tag)
            if tag <= width.mask and owners:
                ctx.report(
                    node,
                    "neutral-tag-owned",
                    f"tag {format_tag(tag, width)} is listed as neutral but is the "
                    f"{WIDTH_WORDS[width]} tag of {ctx.owner_words(sorted(owners))}: a neutral "
                    "tag is allowed to every VM, so it must not steer to any CPU",
                    "host.neutral_tags",
                )
                break
