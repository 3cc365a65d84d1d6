"""Token classification results as entities, the way the transformers token-classification pipeline gives them
(``aggregation_strategy="none"`` or ``"simple"``, labels ``O`` left out). No torch, no HTTP."""

from __future__ import annotations

from collections.abc import Sequence

from service.domain import Entity

IGNORED = "O"


def token_entities(
    text: str,
    offsets: Sequence[tuple[int, int]],
    special: Sequence[int],
    probabilities: Sequence[Sequence[float]],
    labels: Sequence[str],
    aggregation: str,
) -> list[Entity]:
    """One input's entities from its tokens' label probabilities (aligned with ``offsets`` and ``special``)."""
    tokens: list[Entity] = []
    for (start, end), is_special, scores in zip(offsets, special, probabilities, strict=True):
        if is_special:
            continue
        best = max(range(len(scores)), key=scores.__getitem__)
        tokens.append(Entity(label=labels[best], score=scores[best], start=start, end=end, text=text[start:end]))
    if aggregation == "simple":
        tokens = _group(text, tokens)
    return [entity for entity in tokens if entity.label != IGNORED]


def _tag(label: str) -> tuple[str, str]:
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label  # not in B-/I- form: continues a neighbour with the same label


def _group(text: str, tokens: list[Entity]) -> list[Entity]:
    """Neighbouring tokens of one entity merged: same tag, and the later one not a B-."""
    groups: list[list[Entity]] = []
    for token in tokens:
        if groups:
            bi, tag = _tag(token.label)
            _, last_tag = _tag(groups[-1][-1].label)
            if tag == last_tag and bi != "B":
                groups[-1].append(token)
                continue
        groups.append([token])
    merged = []
    for group in groups:
        start, end = group[0].start, group[-1].end
        merged.append(Entity(label=group[0].label.split("-", 1)[-1], score=sum(t.score for t in group) / len(group),
                             start=start, end=end, text=text[start:end]))
    return merged
