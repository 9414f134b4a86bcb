"""Import images from a zip file or folder into a dataset folder with one sub-folder per class.

Two source layouts are recognised. The upstream layout has `dataset/with_mask/` and
`dataset/without_mask/` at any depth, which become the classes `mask` and `no_mask`. Otherwise,
after descending through single wrapper folders such as the top folder of a zip archive, every
sub-folder that contains files is a class folder named after its class. Names that start with "."
and `__MACOSX` folders are ignored at every level.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from facemask.data.images import InvalidImageError, decode_image

logger = logging.getLogger(__name__)

# Upstream folder inside `dataset/` -> class name in this project.
UPSTREAM_CLASSES = {"with_mask": "mask", "without_mask": "no_mask"}

# Image counts stated in the README of chandrikadeb7/Face-Mask-Detection at commit 7e500749. A
# class that differs by more than COUNT_TOLERANCE files gets a warning, not an error, because
# copies of the dataset often miss or add a few files.
EXPECTED_COUNTS = {"mask": 2165, "no_mask": 1930}
COUNT_TOLERANCE = 5

# Suffixes that `has_class_images` counts as images. The import itself decodes every file,
# whatever its name, because some upstream images have no usual suffix.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

# Larger files are skipped unread. This bounds the memory one archive member can take and is far
# above the size of a photo.
MAX_FILE_BYTES = 64 * 2**20

_DRIVE_PREFIX = re.compile(r"^[A-Za-z]:")


class DatasetImportError(ValueError):
    """A source or output folder that cannot be imported, with the reason and the fix."""


@dataclass(frozen=True)
class SkippedSourceFile:
    """A file in a class folder, or an unsafe archive member, that was not imported."""

    path: str
    reason: str


@dataclass
class ImportReport:
    """The outcome of `import_dataset`.

    Attributes:
        source: The zip file or folder that was imported.
        out_dir: The dataset folder that was created.
        layout: `upstream` for `dataset/with_mask` and `dataset/without_mask`, otherwise
            `class-folder`.
        counts: Images imported per class.
        skipped: Files that were not imported, with the reason, in source order.
        warnings: Messages about counts that differ from the upstream README.
    """

    source: Path
    out_dir: Path
    layout: str
    counts: dict[str, int]
    skipped: list[SkippedSourceFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of images imported over all classes."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class _Member:
    name: str  # The path as stored in the source, for messages.
    parts: tuple[str, ...] | None  # None when the path could point outside the output folder.
    is_symlink: bool
    size: int
    read: Callable[[], bytes]


@dataclass(frozen=True)
class _Layout:
    name: str
    base: tuple[str, ...]  # Path of the folder that contains the class folders.
    classes: dict[str, str]  # Class folder name -> class name.


def import_dataset(source: Path, out_dir: Path, *, force: bool = False) -> ImportReport:
    """Copy every decodable image of `source` into `out_dir/<class>/`, keeping file names.

    The images are written into a hidden folder next to `out_dir`, which replaces `out_dir` only
    after every file is copied, so a failed import leaves `out_dir` unchanged. A killed process
    can leave that `.<name>.import-*` folder behind, and it is safe to delete. Sub-folders inside
    a class folder are kept. Symbolic links, absolute paths and paths containing `..` are skipped.

    Args:
        source: A zip file or a folder, in either layout described in the module docstring.
        out_dir: The dataset folder to create. It must be missing or empty unless `force`.
        force: Replace a non-empty `out_dir`.

    Raises:
        DatasetImportError: `source` is missing or not a zip file, it has fewer than two class
            folders, a class has no decodable image, or `out_dir` is not empty and not `force`.
    """
    source = Path(source)
    out_dir = Path(out_dir).resolve()
    check_out_dir(out_dir, force=force)
    with ExitStack() as stack:
        members = _open_source(source, stack)
        layout = _detect_layout(
            [m.parts for m in members if m.parts is not None and not _is_ignored(m.parts)], source
        )
        counts = dict.fromkeys(layout.classes.values(), 0)
        report = ImportReport(source=source, out_dir=out_dir, layout=layout.name, counts=counts)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = out_dir.with_name(f".{out_dir.name}.import-{secrets.token_hex(4)}")
        staging.mkdir()
        try:
            for member in members:
                _import_member(member, layout, staging, report)
            _check_counts(report, layout)
            _replace_dir(staging, out_dir, force=force)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info(
        "Imported %d images from %s into %s %s; skipped %d files",
        report.total,
        source,
        out_dir,
        report.counts,
        len(report.skipped),
    )
    return report


def check_out_dir(out_dir: Path, *, force: bool) -> None:
    """Raise DatasetImportError if `out_dir` is not a folder, or is not empty and not `force`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetImportError(f"Output path {out_dir} is not a folder; choose another --out")
    if not force and out_dir.is_dir() and any(out_dir.iterdir()):
        raise DatasetImportError(
            f"Output folder {out_dir} is not empty; pass --force to replace its contents, "
            "or choose another --out"
        )


def has_class_images(root: Path) -> bool:
    """Return whether a class folder in `root` contains a file with an image suffix."""
    root = Path(root)
    if not root.is_dir():
        return False
    for folder in root.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        for path in folder.rglob("*"):
            hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
            if not hidden and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                return True
    return False


def _open_source(source: Path, stack: ExitStack) -> list[_Member]:
    if source.is_dir():
        return list(_folder_members(source))
    if not source.exists():
        raise DatasetImportError(f"Source {source} not found; pass an existing zip file or folder")
    if not zipfile.is_zipfile(source):
        raise DatasetImportError(f"Source {source} is neither a folder nor a zip file")
    try:
        archive = stack.enter_context(zipfile.ZipFile(source))
    except zipfile.BadZipFile as exc:
        raise DatasetImportError(f"Zip file {source} is damaged: {exc}") from exc
    return list(_zip_members(archive))


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        if info.is_dir():
            continue
        # Unix tools store the file type in the high 16 bits of the external attributes.
        is_symlink = stat.S_ISLNK(info.external_attr >> 16)
        read = partial(archive.read, info)
        yield _Member(info.filename, _safe_parts(info.filename), is_symlink, info.file_size, read)


def _folder_members(root: Path) -> Iterator[_Member]:
    # os.walk does not follow symbolic links to folders, so the walk stays inside `root`.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored((d,)))
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            name = path.relative_to(root).as_posix()
            info = path.lstat()
            yield _Member(
                name, _safe_parts(name), stat.S_ISLNK(info.st_mode), info.st_size, path.read_bytes
            )


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """Split a member path into parts, or return None when it is absolute or contains `..`."""
    # Zip tools on Windows may write backslashes as separators.
    posix = name.replace("\\", "/")
    if "\x00" in posix or posix.startswith("/") or _DRIVE_PREFIX.match(posix):
        return None
    parts = tuple(part for part in posix.split("/") if part not in ("", "."))
    if not parts or ".." in parts:
        return None
    return parts


def _is_ignored(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _detect_layout(paths: list[tuple[str, ...]], source: Path) -> _Layout:
    upstream_bases = {
        p[:-2] for p in paths if len(p) >= 3 and p[-3] == "dataset" and p[-2] in UPSTREAM_CLASSES
    }
    if len(upstream_bases) > 1:
        found = ", ".join(sorted("/".join(base) for base in upstream_bases))
        raise DatasetImportError(
            f"Source {source} contains more than one upstream dataset folder ({found}); "
            "import one of them with --from"
        )
    if upstream_bases:
        return _Layout("upstream", upstream_bases.pop(), dict(UPSTREAM_CLASSES))

    base = _skip_wrapper_folders(paths)
    folders = sorted({p[len(base)] for p in paths if len(p) >= len(base) + 2})
    if len(folders) < 2:
        raise DatasetImportError(
            f"Source {source} has {len(folders)} class folders ({', '.join(folders) or 'none'}), "
            "but at least two are needed. Expected dataset/with_mask and dataset/without_mask, "
            "or one folder per class containing its images."
        )
    return _Layout("class-folder", base, {folder: folder for folder in folders})


def _skip_wrapper_folders(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Return the deepest folder reached through folders that contain just one sub-folder.

    The descent stops at a folder that contains files or several sub-folders. It also stops
    before a single sub-folder that contains only files, because that is a class folder.
    """
    base: tuple[str, ...] = ()
    while True:
        below = [p[len(base) :] for p in paths]
        tops = {rest[0] for rest in below}
        has_files = any(len(rest) == 1 for rest in below)
        if has_files or len(tops) != 1 or all(len(rest) == 2 for rest in below):
            return base
        base += (tops.pop(),)


def _import_member(member: _Member, layout: _Layout, staging: Path, report: ImportReport) -> None:
    if member.parts is None:
        report.skipped.append(
            SkippedSourceFile(member.name, "unsafe path: absolute or containing '..'")
        )
        return
    depth = len(layout.base)
    parts = member.parts
    if _is_ignored(parts) or len(parts) < depth + 2 or parts[:depth] != layout.base:
        return
    class_name = layout.classes.get(parts[depth])
    if class_name is None:
        return
    reason = _copy_image(member, staging / class_name, parts[depth + 1 :])
    if reason is None:
        report.counts[class_name] += 1
    else:
        report.skipped.append(SkippedSourceFile(member.name, reason))


def _copy_image(member: _Member, class_dir: Path, inner: tuple[str, ...]) -> str | None:
    """Decode and copy one file, and return why it was skipped, or None once copied."""
    if member.is_symlink:
        return "symbolic link"
    if member.size > MAX_FILE_BYTES:
        return f"file of {member.size} bytes is larger than the limit of {MAX_FILE_BYTES}"
    # zipfile raises NotImplementedError for unsupported compression methods and RuntimeError
    # for encrypted members.
    try:
        data = member.read()
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        NotImplementedError,
        RuntimeError,
    ) as exc:
        return f"cannot read the file: {exc}"
    try:
        decode_image(data)
    except InvalidImageError as exc:
        return f"not a decodable image: {exc}"
    target = class_dir.joinpath(*inner)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Mode "x" never overwrites, so two members with the same path, or names that differ
        # only in case on a case-insensitive file system, are caught here.
        with target.open("xb") as out:
            out.write(data)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        return f"another imported file already has the path {class_dir.name}/{'/'.join(inner)}"
    return None


def _check_counts(report: ImportReport, layout: _Layout) -> None:
    for folder, class_name in layout.classes.items():
        if report.counts[class_name] == 0:
            path = "/".join((*layout.base, folder))
            raise DatasetImportError(
                f"Class {class_name!r} has no decodable images in {report.source}: the folder "
                f"{path} is missing or contains none"
            )
    if layout.name != "upstream":
        return
    for class_name, expected in EXPECTED_COUNTS.items():
        actual = report.counts[class_name]
        if abs(actual - expected) > COUNT_TOLERANCE:
            message = (
                f"Class {class_name!r} has {actual} images, but the upstream README states "
                f"{expected}; the source may be another version of the dataset"
            )
            logger.warning(message)
            report.warnings.append(message)


def _replace_dir(staging: Path, out_dir: Path, *, force: bool) -> None:
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    # Checked again because another process may have written into `out_dir` meanwhile.
    check_out_dir(out_dir, force=force)
    old = staging.with_name(staging.name + ".old")
    out_dir.rename(old)
    staging.rename(out_dir)
    shutil.rmtree(old)
