"""The canonical label order (ABAW expression challenge) and name mapping.

Every dataset maps its own class names to this order by name; no reader ever
decides label indices itself.
"""
from __future__ import annotations

ABAW_LABELS: tuple[str, ...] = (
    "Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other",
)
NUM_CLASSES = len(ABAW_LABELS)

# Lower-case aliases seen in public FER datasets, mapped to ABAW names.
_ALIASES: dict[str, str] = {
    "neutral": "Neutral", "neu": "Neutral", "ne": "Neutral",
    "anger": "Anger", "angry": "Anger", "ang": "Anger", "an": "Anger",
    "disgust": "Disgust", "disgusted": "Disgust", "dis": "Disgust", "di": "Disgust",
    "fear": "Fear", "fearful": "Fear", "afraid": "Fear", "fea": "Fear", "fe": "Fear",
    "happiness": "Happiness", "happy": "Happiness", "joy": "Happiness", "hap": "Happiness", "ha": "Happiness",
    "sadness": "Sadness", "sad": "Sadness", "sa": "Sadness",
    "surprise": "Surprise", "surprised": "Surprise", "sur": "Surprise", "su": "Surprise",
    "other": "Other", "others": "Other", "contempt": "Other",
}


def canonical_name(name: str) -> str:
    """Return the ABAW class name for a dataset's class ``name`` (case-insensitive).

    Raises ``KeyError`` with the known names when ``name`` has no mapping.
    """
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    raise KeyError(f"unknown expression class {name!r}; known: {sorted(set(_ALIASES))}")


def label_index(name: str) -> int:
    """Index of ``name`` in :data:`ABAW_LABELS`."""
    return ABAW_LABELS.index(canonical_name(name))
