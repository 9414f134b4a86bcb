"""Split scanned images into train, val and test sets, stratified by class and grouped by source.

Copies of one picture must not land in two splits, or validation scores measure memory instead
of generalisation. Two images belong to one group when their bytes are identical, or when their
file names differ only by a copy suffix such as " copy 3" or " (2)" inside the same class.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from facemask.data.scan import DatasetError, ImageRecord

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")

FRACTION_TOLERANCE = 1e-6

FRACTIONS_EXAMPLE = "data.splits=[0.7,0.15,0.15]"

# One or more trailing suffixes that file managers and browsers add to copies: " copy",
# " copy 3", " copy 2 2", " - Copy", " (3)", " (copy)", " (another copy)", " (3rd copy)".
_COPY_SUFFIX = re.compile(
    r"(?:\s+(?:-\s+)?copy(?:\s+\d+)*"
    r"|\s+\((?:\d+|copy|another copy|\d+(?:st|nd|rd|th) copy)\))+$"
)


def validate_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Check the train, val and test fractions and return them as floats.

    Raises:
        DatasetError: There are not exactly 3 values, a value is not a number above 0, or the
            values do not sum to 1 within 1e-6.
    """
    values = list(fractions)
    fix = f"Set 3 fractions for {', '.join(SPLIT_NAMES)} that sum to 1, e.g. {FRACTIONS_EXAMPLE}."
    if len(values) != len(SPLIT_NAMES):
        raise DatasetError(f"data.splits={values} has {len(values)} values, expected 3. {fix}")
    try:
        floats = tuple(float(value) for value in values)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"data.splits={values} contains a non-number. {fix}") from exc
    for name, value in zip(SPLIT_NAMES, floats, strict=True):
        if not math.isfinite(value) or value <= 0:
            raise DatasetError(
                f"data.splits={values} gives {name} the fraction {value}, but each must be "
                f"above 0. {fix}"
            )
    total = math.fsum(floats)
    if abs(total - 1.0) > FRACTION_TOLERANCE:
        raise DatasetError(f"data.splits={values} sums to {total}, not 1. {fix}")
    return floats[0], floats[1], floats[2]


def normalise_stem(filename: str) -> str:
    """Return the lowercased file stem without trailing copy suffixes.

    For example, `0_0_x copy 3.jpg`, `0_0_x copy 2 2.png` and `0_0_X (1).jpg` all give `0_0_x`.
    """
    stem = Path(filename).stem.lower()
    return _COPY_SUFFIX.sub("", stem) or stem


def group_images(records: Sequence[ImageRecord]) -> list[int]:
    """Return a group id per record, so that copies of one picture share an id.

    Records share a group when they have the same sha256, or the same label and normalised stem
    (see `normalise_stem`), directly or through a chain of such links. Group ids count from 0 in
    the order of each group's smallest relpath, so they do not depend on the order of `records`.
    """
    parent = list(range(len(records)))

    def find(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]  # Path halving keeps the trees shallow.
            index = parent[index]
        return index

    first_by_key: dict[tuple[str, str, str], int] = {}
    for index, record in enumerate(records):
        name = record.relpath.rsplit("/", 1)[-1]
        keys = (("sha256", record.sha256, ""), ("stem", record.label, normalise_stem(name)))
        for key in keys:
            other = first_by_key.setdefault(key, index)
            parent[find(index)] = find(other)

    min_relpath: dict[int, str] = {}
    for index, record in enumerate(records):
        root = find(index)
        if root not in min_relpath or record.relpath < min_relpath[root]:
            min_relpath[root] = record.relpath
    order = sorted(min_relpath, key=lambda root: min_relpath[root])
    group_of_root = {root: group for group, root in enumerate(order)}
    return [group_of_root[find(index)] for index in range(len(records))]


def stratified_group_split(
    records: Sequence[ImageRecord],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 42,
) -> list[str]:
    """Assign each record to train, val or test.

    Each class's groups are shuffled with `seed`, ordered largest first, and each is given to
    the split whose image count is furthest below its target, relative to that target. Groups
    never straddle splits, and each class's image counts come close to `fractions`. A group
    whose records carry different labels counts for its majority label, with a warning.

    Returns:
        One of `SPLIT_NAMES` per record, in the order of `records`.

    Raises:
        DatasetError: The fractions are invalid, or a class has fewer than 3 groups.
    """
    targets = np.asarray(validate_fractions(fractions))
    groups = group_images(records)
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    group_label = {group: _majority_label(records, indices) for group, indices in members.items()}

    groups_by_label: dict[str, list[int]] = defaultdict(list)
    for group in sorted(members):
        groups_by_label[group_label[group]].append(group)
    rng = np.random.default_rng(seed)
    split_of_group: dict[int, int] = {}
    for label in sorted(groups_by_label):
        label_groups = groups_by_label[label]
        if len(label_groups) < len(SPLIT_NAMES):
            raise DatasetError(
                f"Class {label!r} has {len(label_groups)} distinct image groups, but a "
                f"train/val/test split needs at least 3. Add distinct images to class {label!r}."
            )
        shuffled = [label_groups[i] for i in rng.permutation(len(label_groups))]
        # A stable sort keeps the shuffled order among groups of the same size.
        shuffled.sort(key=lambda group: len(members[group]), reverse=True)
        total = sum(len(members[group]) for group in shuffled)
        counts = np.zeros(len(SPLIT_NAMES))
        for group in shuffled:
            deficit = (targets * total - counts) / (targets * total)
            split = int(np.argmax(deficit))  # Ties go to the earlier split.
            split_of_group[group] = split
            counts[split] += len(members[group])
    return [SPLIT_NAMES[split_of_group[group]] for group in groups]


def _majority_label(records: Sequence[ImageRecord], indices: list[int]) -> str:
    labels = Counter(records[index].label for index in indices)
    # Sorting first makes ties go to the alphabetically first label.
    label, _ = max(sorted(labels.items()), key=lambda item: item[1])
    if len(labels) > 1:
        logger.warning(
            "Images of one group carry different labels %s and count as %r: %s",
            dict(labels),
            label,
            ", ".join(records[index].relpath for index in indices),
        )
    return label


def build_manifest(
    root: Path,
    records: Sequence[ImageRecord],
    splits: Sequence[str],
    groups: Sequence[int],
) -> pd.DataFrame:
    """Return one row per record with columns path, label, sha256, group, split, width, height.

    `path` is the relpath under `root`. The root is kept in `DataFrame.attrs["root"]`.
    """
    if not len(records) == len(splits) == len(groups):
        raise ValueError(
            f"records, splits and groups have different lengths "
            f"({len(records)}, {len(splits)}, {len(groups)}); pass one split and group per record"
        )
    manifest = pd.DataFrame(
        {
            "path": [record.relpath for record in records],
            "label": [record.label for record in records],
            "sha256": [record.sha256 for record in records],
            "group": list(groups),
            "split": list(splits),
            "width": [record.width for record in records],
            "height": [record.height for record in records],
        }
    )
    manifest.attrs["root"] = str(root)
    return manifest


def split_counts(manifest: pd.DataFrame) -> pd.DataFrame:
    """Count images per split (rows train, val, test) and class (columns), with a total column."""
    counts = pd.crosstab(manifest["split"], manifest["label"])
    classes = sorted(manifest["label"].unique())
    counts = counts.reindex(index=list(SPLIT_NAMES), columns=classes, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.index.name = "split"
    counts.columns.name = None
    return counts
