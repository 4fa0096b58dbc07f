"""Find samples in a dataset: class folders (BUSI layout included), CSV manifests, the BUS-BRA layout.

>>> samples = discover("Dataset_BUSI_with_GT", classes=["benign", "malignant"])  # doctest: +SKIP
>>> samples[0].label, samples[0].masks                                          # doctest: +SKIP
('benign', ('.../benign (1)_mask.png',))
"""
from __future__ import annotations

import csv
import io
import errno
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import OptionError, SonocadError, SonocadWarning

MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<n>\d+))?$", re.IGNORECASE)
BUSBRA_CSV = "bus_data.csv"
MANIFEST_COLUMNS = {"path", "label", "group", "mask", "site"}


@dataclass(frozen=True)
class Sample:
    """One image: where it is, its class, and what it must stay together with when splitting."""

    path: str
    label: str
    group: str | None = None   # patient / lesion / duplicate group: never split across train and test
    masks: tuple[str, ...] = field(default=())
    site: str | None = None
    # the manifest's other columns as (lower-case name, text) pairs, e.g. a reader's BI-RADS category
    columns: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def column(self, name: str) -> str | None:
        return dict(self.columns).get(name.lower())


def not_a_file(p: Path) -> str | None:
    """Why `p` cannot be read as a file (does not exist, is a folder, a link loop ...), or None when it can."""
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "is a symbolic link to a missing file" if p.is_symlink() else "does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, not a file"
    return None if stat.S_ISREG(st.st_mode) else "is not a regular file"


def _missing(p: Path) -> SonocadError:
    """The error for a file or folder argument that is not there (or is a link loop, a broken link)."""
    why = not_a_file(p)
    return SonocadError(f"{p}: {'no such file or folder' if why in (None, 'does not exist') else why}")


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name in ("Thumbs.db", "desktop.ini")


def discover(data: str | Path | list, classes: list[str] | None = None, *,
             allow_missing_classes: bool = False, frames: str = "first") -> list[Sample]:
    """Samples of `data` (a folder, a CSV manifest, or a list of them, one per site), restricted to
    and ordered like `classes`. Raises SonocadError naming the problem for anything unusable.
    `frames`: of a multi-frame DICOM file (a cine loop) use the first frame, the middle one, or all of them
    (each a sample "file.dcm#frame=K", the file their group so that they never cross a split)."""
    if isinstance(data, (list, tuple)):
        if len(data) == 1:
            return discover(data[0], classes, allow_missing_classes=allow_missing_classes, frames=frames)
        out: list[Sample] = []
        for i, d in enumerate(data):
            site = Path(d).name if Path(d).is_dir() else Path(d).stem
            found = [s if s.site else replace(s, site=site)
                     for s in discover(d, classes, allow_missing_classes=allow_missing_classes, frames=frames)]
            twice = shared_images(out, found)
            if twice:    # one scan counted twice: on both sides of a split, or twice in a test's figures
                raise SonocadError(f"{d}: {len(twice)} image(s) already in {', '.join(map(str, data[:i]))} "
                                   f"(e.g. {twice[0]}); give each image once")
            out += found
        return out
    return expand_frames(_discover_one(data, classes, allow_missing_classes), frames)


def shared_images(a: list[Sample], b: list[Sample]) -> list[str]:
    """The images (files, or frames of one) that both lists of samples hold, by their resolved paths."""
    seen = {str(Path(s.path).resolve()) for s in a}
    return [s.path for s in b if str(Path(s.path).resolve()) in seen]


def expand_frames(samples: list[Sample], frames: str) -> list[Sample]:
    """Samples with multi-frame DICOM files replaced by the frames asked for (see discover)."""
    from .dicom import frame_refs

    if frames == "first":
        return samples
    out = []
    for s in samples:
        refs = frame_refs(s.path, frames)
        if len(refs) == 1 and refs[0] == s.path:
            out.append(s)
        else:
            group = s.group if s.group is not None else f"file:{s.path}"
            out += [replace(s, path=r, group=group, masks=()) for r in refs]
    return out


def _discover_one(data, classes, allow_missing_classes: bool) -> list[Sample]:
    data = Path(data)
    if not data.exists():
        raise _missing(data)
    if data.is_file():
        samples = read_manifest(data)
    elif (data / BUSBRA_CSV).is_file() and (data / "Images").is_dir():
        samples = read_busbra(data)
    else:
        samples = scan_class_folders(data, classes)      # the folders of other classes are not read
        has = [d.name for d in class_dirs(data)]
        return select_classes(samples, classes, str(data), allow_missing=allow_missing_classes, has=has)
    return select_classes(samples, classes, str(data), allow_missing=allow_missing_classes)


def class_dirs(root: Path) -> list[Path]:
    """The class folders of a class-folder dataset (its sub-folders, hidden ones left out), sorted."""
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p))
    except OSError as e:
        raise SonocadError(f"{root}: cannot list folder ({e.strerror})") from None


def scan_class_folders(root: Path, classes: list[str] | None = None) -> list[Sample]:
    """One sub-folder per class; `<image>_mask.png` / `<image>_mask_N.png` are masks of `<image>.png`."""
    dirs = class_dirs(root)
    if not dirs:
        raise SonocadError(f"{root}: expected one sub-folder per class (or a CSV manifest), found none")
    samples = []
    for d in dirs:
        if classes is not None and d.name not in classes:
            continue
        files = sorted((p for p in d.rglob("*") if p.is_file() and not _is_hidden(p)), key=_natural_key)
        if not files:
            raise SonocadError(f"{d}: class folder is empty")
        images: dict[tuple[Path, str], Path] = {}
        masks: dict[tuple[Path, str], list[Path]] = {}
        for f in files:
            m = MASK_RE.match(f.stem)
            if m:
                masks.setdefault((f.parent, m["stem"]), []).append(f)
            else:
                images[(f.parent, f.stem)] = f
        for key, ms in masks.items():
            if key not in images:
                raise SonocadError(f"{ms[0]}: mask file has no image {key[1]}{ms[0].suffix} beside it")
        if not images:
            raise SonocadError(f"{d}: class folder holds only mask files, no images")
        for key, f in images.items():
            samples.append(Sample(str(f), d.name, masks=tuple(str(m) for m in masks.get(key, []))))
    return samples


def _natural_key(p: Path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(p))]


def image_files(inputs: list[str | Path]) -> list[Path]:
    """Image paths from files and folders: folders are searched recursively, leaving out lesion masks
    (`*_mask*`), hidden files and folders, and files that are not images by their suffix."""
    from .images import IMAGE_SUFFIXES

    files = []
    if any(str(p) == "" for p in inputs):      # Path("") is the current folder: searched whole by mistake
        raise SonocadError("an empty path was given (an unset shell variable?); name the image files or folders")
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                            and not MASK_RE.match(f.stem)
                            and not any(_is_hidden(Path(part)) for part in f.relative_to(p).parts)),
                           key=_natural_key)
            if not found:
                raise SonocadError(f"{p}: no images in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise _missing(p)
    return files


def _csv_rows(path: Path, what: str) -> tuple[list[str], list[dict]]:
    """The header and the rows of a UTF-8 CSV file (`what` it is, for the messages)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise SonocadError(f"{path}: not a UTF-8 text CSV {what}") from None
    except OSError as e:
        raise SonocadError(f"{path}: cannot read ({e.strerror})") from None
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))      # a quoted field may hold a line break
        return list(reader.fieldnames or []), list(reader)
    except csv.Error as e:
        raise SonocadError(f"{path}: malformed CSV ({e})") from None


def read_manifest(path: Path) -> list[Sample]:
    """CSV with columns path,label and optional group, mask, site; relative paths resolve against its folder."""
    fields, rows = _csv_rows(path, "manifest")
    header = [h.strip().lower() for h in fields]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:      # which of two label columns holds the labels is a guess sonocad does not make
        raise SonocadError(f"{path}: column {twice[0]!r} appears more than once in the header (names are "
                           "compared without case)")
    missing = {"path", "label"} - set(header)
    if missing:
        raise SonocadError(f"{path}: manifest needs columns path,label (missing: {', '.join(sorted(missing))})")
    if not rows:
        raise SonocadError(f"{path}: manifest has no rows")
    base = path.parent
    samples = []
    first_row: dict[str, tuple[int, str]] = {}
    for i, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
        if not row.get("path") or not row.get("label"):
            raise SonocadError(f"{path}:{i}: row needs a path and a label")
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else base / p
        why = not_a_file(p)
        if why:
            raise SonocadError(f"{path}:{i}: image {p} {why}")
        key = str(p.resolve())
        if key in first_row:     # one image twice would sit on both sides of a split, or teach two labels
            j, label = first_row[key]
            why = f"as {label} and as {row['label']}" if label != row["label"] else "twice"
            raise SonocadError(f"{path}:{i}: image {p} is listed {why} (rows {j} and {i})")
        first_row[key] = (i, row["label"])
        masks = ()
        if row.get("mask"):
            m = Path(row["mask"]).expanduser()
            m = m if m.is_absolute() else base / m
            why = not_a_file(m)
            if why:
                raise SonocadError(f"{path}:{i}: mask {m} {why}")
            masks = (str(m),)
        other = tuple((k, v) for k, v in row.items() if k not in MANIFEST_COLUMNS and k)
        samples.append(Sample(str(p), row["label"], row.get("group") or None, masks, row.get("site") or None, other))
    return samples


def read_busbra(root: Path) -> list[Sample]:
    """The BUS-BRA release: bus_data.csv (ID, Case, Pathology), Images/ID.png, Masks/mask_XXXX-s.png.
    The patient (Case) becomes the group, so both views of one patient stay on one side of a split."""
    samples, first_row = [], {}
    table = root / BUSBRA_CSV
    fields, rows = _csv_rows(table, "file")
    if not {"ID", "Case", "Pathology"} <= set(fields):
        raise SonocadError(f"{table}: expected BUS-BRA columns ID, Case, Pathology")
    for i, row in enumerate(rows, start=2):
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("ID", "Case", "Pathology")):
            raise SonocadError(f"{table}:{i}: row needs an ID, a Case and a Pathology")
        if row["ID"] in first_row:
            raise SonocadError(f"{table}:{i}: image {row['ID']} is listed twice (rows {first_row[row['ID']]} and "
                               f"{i})")
        first_row[row["ID"]] = i
        img = root / "Images" / f"{row['ID']}.png"
        why = not_a_file(img)
        if why:
            raise SonocadError(f"{table}:{i}: image {img} {why}")
        mask = root / "Masks" / f"{row['ID'].replace('bus_', 'mask_', 1)}.png"
        samples.append(Sample(str(img), row["Pathology"].strip().lower(), f"busbra-{row['Case']}",
                              (str(mask),) if mask.is_file() else (), "busbra",
                              (("birads", (row.get("BIRADS") or "").strip()),)))
    return samples


def select_classes(samples: list[Sample], classes: list[str] | None, where: str,
                   allow_missing: bool = False, has: list[str] | None = None) -> list[Sample]:
    """Keep the samples of `classes` (all found classes, sorted, when None); check each class is present.
    `has`: the classes `where` holds, for the message (default: those of `samples`)."""
    found = Counter(s.label for s in samples)
    if classes is None:
        classes = sorted(found)
    unknown = [c for c in classes if c not in found]
    if unknown and not allow_missing:
        raise OptionError("classes", f"{', '.join(unknown)} not found in {where} "
                          f"(it has: {', '.join(has if has is not None else sorted(found)) or 'no classes'})")
    kept = [s for s in samples if s.label in classes]
    if not kept:
        raise SonocadError(f"{where}: no images of classes {', '.join(classes)}")
    left = {label: n for label, n in sorted(found.items()) if label not in classes}
    if left:
        near = {label: c for label in left for c in classes if label.strip().lower() == c.lower()}
        hint = "".join(f"; is {label!r} meant to be {c!r}? labels are case-sensitive" for label, c in near.items())
        warnings.warn(SonocadWarning(f"{where}: left out {sum(left.values())} image(s) of classes not asked for: "
                                     + ", ".join(f"{k} ({v})" for k, v in left.items()) + hint))
    return kept


def resolve_classes(samples: list[Sample], classes: list[str] | None, positive: str | None) -> tuple[list[str], str | None]:
    """Class order and positive class of a task. Binary tasks put the positive class last (index 1)."""
    found = sorted({s.label for s in samples})
    classes = list(classes) if classes else found
    if len(classes) < 2 or len(found) < 2:
        raise SonocadError(f"need at least two classes to train, found only: {', '.join(found)}")
    if len(classes) != 2:
        if positive is not None and positive not in classes:
            raise OptionError("positive", f"{positive!r} is not one of the classes {', '.join(classes)}")
        return classes, positive
    if positive is None:
        positive = "malignant" if "malignant" in classes else classes[1]
    if positive not in classes:
        raise OptionError("positive", f"{positive!r} is not one of the classes {', '.join(classes)}")
    return [c for c in classes if c != positive] + [positive], positive
