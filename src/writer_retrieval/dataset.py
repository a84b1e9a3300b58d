"""Dataset stage: adapters that turn a handwriting collection into index.parquet + rejected.parquet.

Every input file ends up either in the index or in rejected.parquet with a reason; by default
any rejection stops the run (`on_bad_input: stop`), with `skip` the run goes on.
Adapters: synthetic, icdar2017, icdar2019, cvl, hisfrag20, folder, words.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import re
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from .errors import InputError
from .imaging import IMAGE_SUFFIXES, BadImageError, load_gray, write_gray
from .storage import write_parquet

log = logging.getLogger("writer_retrieval")

INDEX_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("path", pa.string()), ("writer", pa.string()), ("page", pa.string()),
    ("split", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("ground_truth", pa.string()),  # ink mask path where the collection has one (synthetic), else null
])
REJECTED_SCHEMA = pa.schema([("path", pa.string()), ("reason", pa.string())])
SPLITS = ("train", "test")

# Historical-WI / CVL / HisFrag20 file name rules (matched on the file stem).
ICDAR2017_NAME = re.compile(r"^(?P<writer>\d+)-IMG_MAX_(?P<id>\d+)$")
CVL_NAME = re.compile(r"^(?P<writer>\d{4})-(?P<page>\d+)(?P<cropped>-cropped)?$")
HISFRAG20_NAME = re.compile(r"^(?P<writer>\d+)_(?P<page>\d+)_(?P<fragment>\d+)$")


class DatasetError(InputError):
    """A dataset that cannot be indexed as configured."""


@dataclass
class Candidate:
    """An input file that parsed as a document; it still has to pass the image checks."""
    path: Path
    writer: str
    page: str
    doc_id: str
    split: str | None = None
    ground_truth: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Collected:
    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------- file scanning

def _walk(root: Path, ignore: list[str]) -> tuple[list[Path], int]:
    """Files below `root` (sorted) that no `ignore` pattern matches, and how many were ignored."""
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist (check 'root' / 'splits' in the config)")
    files, ignored = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        rel_parts = path.relative_to(root).parts
        if any(fnmatch.fnmatch(part, pat) for part in rel_parts for pat in ignore):
            ignored += 1
        else:
            files.append(path)
    return files, ignored


def _scan(root: Path, ignore: list[str], split: str | None, out: Collected) -> list[tuple[Path, str | None]]:
    """Image files below `root` (sorted); other files are rejected unless they match `ignore`."""
    paths, ignored = _walk(root, ignore)
    files = []
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            out.rejected.append((str(path), f"not an image file (suffix '{path.suffix}')"))
            continue
        files.append((path, split))
    if ignored:
        log.info("%s: %d non-input files matched 'ignore' patterns and were not read", root, ignored)
    return files


def _scan_roots(settings: dict) -> list[tuple[Path, str | None]]:
    """(folder, split) pairs an adapter reads: one per configured split, else the root itself."""
    root = Path(settings["root"])
    if settings.get("splits"):
        return [(root / sub, split) for split, sub in settings["splits"].items()]
    return [(root, None)]


def _input_files(settings: dict, out: Collected) -> list[tuple[Path, str | None]]:
    files = []
    for folder, split in _scan_roots(settings):
        files += _scan(folder, settings["ignore"], split, out)
    return files


def _relative_name(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _labels_path(settings: dict) -> Path:
    path = Path(settings["labels"])
    if not path.is_absolute():
        path = Path(settings["root"]) / path
    if not path.is_file():
        raise DatasetError(f"{path}: labels file not found (check 'labels' in the config)")
    return path


def source_manifest(settings: dict) -> str:
    """A short fingerprint of a dataset's input files (names, sizes, mtimes), decoding nothing.

    Given to the dataset rule as a param, so the index is rebuilt when a page is added, removed
    or replaced, while DAG building stays a directory walk. "" for generated (root-less) datasets.
    """
    if not settings.get("root"):
        return ""
    root = Path(settings["root"])
    paths = {p for folder, _ in _scan_roots(settings) for p in _walk(folder, settings["ignore"])[0]}
    if settings.get("labels"):
        paths.add(_labels_path(settings))  # usually matched by the '*.csv' ignore pattern, yet an input
    digest = hashlib.sha256()
    for name, path in sorted((_relative_name(p, root), p) for p in paths):
        st = path.stat() if path.exists() else path.lstat()  # a broken link still counts (it is rejected)
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return f"{len(paths)} files, sha256 {digest.hexdigest()[:16]}"


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


# How spreadsheets, pandas and Python exports spell an empty cell; none of them names a writer.
_MISSING_LABELS = {"", "nan", "none", "null"}


def _checked_writer(out: Collected, path: Path, value, where: str) -> str | None:
    """The writer label without surrounding blanks, or None (and `path` rejected) where it is empty.

    An empty label would make one big pseudo-writer '' whose pages all count as hits of each other.
    """
    writer = "" if value is None else str(value).strip()
    if writer.lower() in _MISSING_LABELS:
        out.rejected.append((str(path), f"empty writer label {where}"))
        return None
    return writer


# ----------------------------------------------------------------------------- adapters

def _by_stem_pattern(settings: dict, out: Collected, pattern: re.Pattern, describe: str, page_of) -> None:
    for path, split in _input_files(settings, out):
        m = pattern.match(path.stem)
        if not m:
            out.rejected.append((str(path), f"name does not match the {describe} pattern {pattern.pattern}"))
            continue
        out.candidates.append(Candidate(path, m["writer"], page_of(m, path), _safe_id(path.stem), split))


def adapter_icdar2017(settings: dict, generated: Path, workers: int) -> Collected:
    out = Collected()
    _by_stem_pattern(settings, out, ICDAR2017_NAME, "ICDAR2017 '{writer}-IMG_MAX_{id}'", lambda m, p: p.stem)
    return out


def adapter_hisfrag20(settings: dict, generated: Path, workers: int) -> Collected:
    out = Collected()
    _by_stem_pattern(settings, out, HISFRAG20_NAME, "HisFrag20 '{writer}_{page}_{fragment}'",
                     lambda m, p: f"{m['writer']}_{m['page']}")
    return out


def adapter_cvl(settings: dict, generated: Path, workers: int) -> Collected:
    out = Collected()
    _by_stem_pattern(settings, out, CVL_NAME, "CVL '{writer:04d}-{page}[-cropped]'",
                     lambda m, p: f"{m['writer']}-{m['page']}")
    # CVL ships full and cropped scans of the same page: keeping both would put a page in its own gallery.
    by_page: dict[str, list[Candidate]] = defaultdict(list)
    for c in out.candidates:
        by_page[c.page].append(c)
    kept = []
    for page, cands in by_page.items():
        cands.sort(key=lambda c: (not c.path.stem.endswith("-cropped"), str(c.path)))
        kept.append(cands[0])
        for c in cands[1:]:
            out.rejected.append((str(c.path), f"duplicate of CVL page {page} (using {cands[0].path.name})"))
    out.candidates = kept
    return out


def _read_labels(settings: dict, required: list[str]) -> tuple[Path, pd.DataFrame]:
    path = _labels_path(settings)
    try:
        labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: labels file is not a readable CSV ({exc})") from None
    missing = [c for c in required if c not in labels.columns]
    if missing:
        raise DatasetError(f"{path}: labels CSV lacks column(s) {', '.join(missing)}; "
                           f"it has {', '.join(labels.columns)}")
    return path, labels


def _match_labels(settings: dict, out: Collected, files, labels_path: Path, key_of_file, keys: pd.Series,
                  writers: pd.Series):
    """(path, split, row, writer) of files with a label row; unlisted files, listed-but-missing
    files and rows with an empty `writers` cell are rejected."""
    dup = keys[keys.duplicated()]
    if len(dup):
        raise DatasetError(f"{labels_path}: {len(dup)} duplicate entries, e.g. {dup.iloc[0]!r}")
    row_of = {k: i for i, k in enumerate(keys)}
    seen = set()
    pairs = []
    for path, split in files:
        key = key_of_file(path)
        if key not in row_of:
            out.rejected.append((str(path), f"not listed in {labels_path.name}"))
            continue
        seen.add(key)
        row = row_of[key]
        where = f"in {labels_path.name} (column {writers.name!r} is {writers.iloc[row]!r})"
        writer = _checked_writer(out, path, writers.iloc[row], where)
        if writer is not None:
            pairs.append((path, split, row, writer))
    root = Path(settings["root"])
    for key in keys:
        if key not in seen:
            out.rejected.append((str(root / key), f"listed in {labels_path.name} but no such file"))
    return pairs


def adapter_icdar2019(settings: dict, generated: Path, workers: int) -> Collected:
    out = Collected()
    labels_path, labels = _read_labels(settings, ["FILENAME", "ID"])
    files = _input_files(settings, out)
    # FILENAME may be given with or without the image suffix.
    with_suffix = labels["FILENAME"].str.contains(r"\.[A-Za-z0-9]+$", regex=True).all()
    key_of_file = (lambda p: p.name) if with_suffix else (lambda p: p.stem)
    for path, split, _, writer in _match_labels(settings, out, files, labels_path, key_of_file, labels["FILENAME"],
                                                labels["ID"]):
        out.candidates.append(Candidate(path, writer, path.stem, _safe_id(path.stem), split))
    return out


def _relative_id(path: Path, root: Path) -> str:
    return _safe_id("__".join(path.relative_to(root).with_suffix("").parts))


def _labelled_files(settings: dict, out: Collected) -> list[tuple[Path, str | None, dict]]:
    """(path, split, fields) for folder-like adapters, from a labels CSV or a filename regex."""
    root = Path(settings["root"])
    files = _input_files(settings, out)
    result = []
    if settings.get("labels"):
        labels_path, labels = _read_labels(settings, ["path", "writer"])
        keys = labels["path"].map(lambda s: str(Path(s)))
        for path, split, row, writer in _match_labels(settings, out, files, labels_path,
                                                      lambda p: str(p.relative_to(root)), keys, labels["writer"]):
            result.append((path, split, {**labels.iloc[row].to_dict(), "writer": writer}))
        return result
    try:
        pattern = re.compile(settings["pattern"])
    except re.error as exc:
        raise DatasetError(f"'pattern' {settings['pattern']!r} is not a valid regex: {exc}") from None
    if "writer" not in pattern.groupindex:
        raise DatasetError(f"'pattern' {settings['pattern']!r} needs a named group (?P<writer>...)")
    for path, split in files:
        m = pattern.fullmatch(path.name) or pattern.fullmatch(path.stem)
        if not m:
            out.rejected.append((str(path), f"name does not match pattern {pattern.pattern}"))
            continue
        # An optional or empty-matching writer group can leave the writer out of a name that matches.
        where = f"in the file name (group 'writer' of pattern {pattern.pattern} is empty)"
        writer = _checked_writer(out, path, m["writer"], where)
        if writer is not None:
            result.append((path, split, {**{k: v for k, v in m.groupdict().items() if v is not None},
                                         "writer": writer}))
    return result


def adapter_folder(settings: dict, generated: Path, workers: int) -> Collected:
    out = Collected()
    root = Path(settings["root"])
    for path, split, fields in _labelled_files(settings, out):
        doc_id = _relative_id(path, root)
        label_split = fields.get("split") or None
        if label_split is not None and label_split not in SPLITS:
            out.rejected.append((str(path), f"split {label_split!r} is not one of {', '.join(SPLITS)}"))
            continue
        out.candidates.append(Candidate(path, str(fields["writer"]), str(fields.get("page") or doc_id),
                                        doc_id, split or label_split))
    return out


def adapter_synthetic(settings: dict, generated: Path, workers: int) -> Collected:
    from .synthetic import generate_collection

    table = generate_collection(
        generated, writers=settings["writers"], pages_per_writer=settings["pages_per_writer"],
        train_writers=settings["train_writers"], page_width=settings["page_width"],
        page_height=settings["page_height"], difficulty=settings["difficulty"], seed=settings["seed"],
        jpeg_quality=settings["jpeg_quality"], workers=workers)
    out = Collected()
    for row in table.itertuples(index=False):
        out.candidates.append(Candidate(Path(row.path), row.writer, row.page, _safe_id(row.page), row.split,
                                        ground_truth=row.ink_mask))
    return out


# ----------------------------------------------------------------------------- words -> pseudo-pages

def _ruled_rows(gray: np.ndarray, edge: int = 12, dark: int = 128, min_run: float = 0.5) -> tuple[int, int]:
    """Rows to cut at the top and bottom edge: straight dark lines longer than `min_run` x width."""
    h, w = gray.shape
    ink = gray < dark

    def is_rule(row: np.ndarray) -> bool:
        if row.mean() < min_run:
            return False
        padded = np.concatenate([[0], row.astype(np.int8), [0]])
        d = np.diff(padded)
        runs = np.flatnonzero(d == -1) - np.flatnonzero(d == 1)
        return runs.max() >= min_run * w

    top = 0
    for r in range(min(edge, h)):
        if is_rule(ink[r]):
            top = r + 1
    bottom = 0
    for r in range(min(edge, h)):
        if is_rule(ink[h - 1 - r]):
            bottom = r + 1
    if top + bottom >= h:
        return 0, 0
    return top, bottom


def _page_order(items: list[dict], rng: np.random.Generator) -> list[dict]:
    """Shuffle one writer's word images so consecutive ones are different words (round robin)."""
    by_word: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_word[it["word"]].append(it)
    words = sorted(by_word)
    rng.shuffle(words)
    queues = []
    for w in words:
        q = by_word[w]
        rng.shuffle(q)
        queues.append(q)
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop())
    return order


def _chunk(order: list, per_page: int) -> list[list]:
    pages = [order[i:i + per_page] for i in range(0, len(order), per_page)]
    # A short last page would be a weak document: spread its words over the other pages instead.
    if len(pages) > 1 and len(pages[-1]) < math.ceil(per_page / 2):
        for i, it in enumerate(pages.pop()):
            pages[i % len(pages)].append(it)
    return pages


def _compose_page(items: list[dict], page_width: int, gap: int, trim: bool) -> tuple[np.ndarray, list[dict]]:
    crops = []
    for it in items:
        gray = load_gray(it["path"])
        top, bottom = _ruled_rows(gray) if trim else (0, 0)
        crops.append((it, gray[top:gray.shape[0] - bottom], top, bottom))
    width = max(page_width, max(c[1].shape[1] for c in crops) + 2 * gap)
    placements, x, y, row_h = [], gap, gap, 0
    for it, img, top, bottom in crops:
        h, w = img.shape
        if x > gap and x + w + gap > width:
            x, y, row_h = gap, y + row_h + gap, 0
        placements.append((it, img, x, y, top, bottom))
        x += w + gap
        row_h = max(row_h, h)
    height = y + row_h + gap
    page = np.full((height, width), 255, np.uint8)
    layout = []
    for it, img, x0, y0, top, bottom in placements:
        page[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img
        layout.append({"source_path": str(it["path"]), "word": it["word"], "x": x0, "y": y0,
                       "width": img.shape[1], "height": img.shape[0],
                       "trimmed_top": top, "trimmed_bottom": bottom})
    return page, layout


def adapter_words(settings: dict, generated: Path, workers: int) -> Collected:
    """Tile word images of each writer into pseudo-pages (deterministic for a seed)."""
    collected = Collected()
    items = []
    for path, split, fields in _labelled_files(settings, collected):
        items.append({"path": path, "split": split or (fields.get("split") or None),
                      "writer": str(fields["writer"]), "word": str(fields.get("word") or path.stem)})
    # Word images are checked before tiling, so a bad one is rejected by its own name.
    ok, bad = _inspect_all([Path(it["path"]) for it in items], settings["empty_page_ink"], workers,
                           Path(settings["root"]))
    collected.rejected += bad
    items = [it for it, good in zip(items, ok) if good is not None]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for it in items:
        groups[(it["writer"], it["split"])].append(it)
    pages_dir = generated / "pages"
    layout_rows = []
    out = Collected(rejected=collected.rejected)
    jobs = []
    for (writer, split), group in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        seed = np.random.SeedSequence([settings["seed"], *map(ord, writer), *map(ord, str(split))])
        order = _page_order(sorted(group, key=lambda it: str(it["path"])), np.random.default_rng(seed))
        for n, page_items in enumerate(_chunk(order, settings["words_per_page"]), start=1):
            doc_id = _safe_id(f"{writer}-{split or 'all'}-p{n:03d}" if split else f"{writer}-p{n:03d}")
            jobs.append((doc_id, writer, split, page_items))
    for doc_id, writer, split, page_items in tqdm(jobs, desc="tiling word pages", unit="page", mininterval=2):
        page, layout = _compose_page(page_items, settings["page_width"], settings["gap"], settings["trim_ruled_lines"])
        path = pages_dir / f"{doc_id}.png"
        write_gray(path, page)
        layout_rows += [{"doc_id": doc_id, **row} for row in layout]
        out.candidates.append(Candidate(path, writer, doc_id, doc_id, split))
    generated.mkdir(parents=True, exist_ok=True)
    write_parquet(pd.DataFrame(layout_rows, columns=["doc_id", "source_path", "word", "x", "y", "width", "height",
                                                     "trimmed_top", "trimmed_bottom"]),
                  generated / "pages.parquet")
    trimmed = sum(1 for r in layout_rows if r["trimmed_top"] or r["trimmed_bottom"])
    log.info("tiled %d word images into %d pages; %d images had ruled lines trimmed (see pages.parquet)",
             len(layout_rows), len(jobs), trimmed)
    return out


ADAPTERS = {
    "synthetic": adapter_synthetic, "icdar2017": adapter_icdar2017, "icdar2019": adapter_icdar2019,
    "cvl": adapter_cvl, "hisfrag20": adapter_hisfrag20, "folder": adapter_folder, "words": adapter_words,
}


# ----------------------------------------------------------------------------- image checks

def inspect_image(path: Path, empty_page_ink: float) -> tuple[int, int] | str:
    """(width, height) of a usable page, or the reason it is rejected."""
    try:
        gray = load_gray(path)
    except BadImageError as exc:
        return str(exc)
    h, w = gray.shape
    if h < 8 or w < 8:
        return f"image too small ({w}x{h})"
    # Ink-like pixels: far from the page's typical (paper) value. Conservative on purpose:
    # only near-uniform pages are called empty.
    step = max(1, int(math.sqrt(h * w / 4e6)))
    sample = gray[::step, ::step].astype(np.int16)
    share = float((np.abs(sample - np.median(sample)) > 40).mean())
    if share < empty_page_ink:
        return f"empty page (only {share:.4%} ink-like pixels; threshold empty_page_ink={empty_page_ink})"
    return w, h


def _inspect_one(args):
    return inspect_image(*args)


def _file_digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _first_copies(paths: list[Path], base: Path, rejected: list) -> list[bool]:
    """Keep-mask over `paths`: False for a byte-identical later copy, rejected naming the first.

    A page indexed twice is a free hit in its own gallery. Only files of equal size are hashed;
    zero-byte and unreadable files are left to the image check, which gives the better reason.
    """
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, path in enumerate(paths):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size:
            by_size[size].append(i)
    keep = [True] * len(paths)
    for group in (g for g in by_size.values() if len(g) > 1):
        first: dict[str, int] = {}
        for i in group:
            try:
                digest = _file_digest(paths[i])
            except OSError:
                continue
            if digest in first:
                keep[i] = False
                rejected.append((str(paths[i]), f"duplicate of {_relative_name(paths[first[digest]], base)}"))
            else:
                first[digest] = i
    return keep


def _inspect_all(paths: list[Path], empty_page_ink: float, workers: int, base: Path):
    """Drop byte-identical copies, then check every image (in parallel); returns per-path (w, h)
    or None, and the rejected rows (duplicates named relative to `base`)."""
    rejected: list[tuple[str, str]] = []
    todo = [i for i, keep in enumerate(_first_copies(paths, base, rejected)) if keep]
    args = [(paths[i], empty_page_ink) for i in todo]
    desc = "checking images"
    if workers > 1 and len(args) > 16:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_inspect_one, args, chunksize=8), total=len(args), desc=desc,
                                unit="img", mininterval=2))
    else:
        results = [_inspect_one(a) for a in tqdm(args, desc=desc, unit="img", mininterval=2)]
    sizes: list[tuple[int, int] | None] = [None] * len(paths)
    for i, r in zip(todo, results):
        if isinstance(r, str):
            rejected.append((str(paths[i]), r))
        else:
            sizes[i] = r
    return sizes, rejected


# ----------------------------------------------------------------------------- index

def assign_splits(writers: pd.Series, given: pd.Series, fraction: float, seed: int) -> pd.Series:
    """Keep given splits; writers without one are split by writer (seeded), `fraction` to train."""
    split = given.copy()
    missing = split.isna()
    if missing.any():
        free = sorted(set(writers[missing]))
        rng = np.random.default_rng(seed)
        order = [free[i] for i in rng.permutation(len(free))]
        n_train = int(round(fraction * len(free)))
        train = set(order[:n_train])
        split[missing] = writers[missing].map(lambda w: "train" if w in train else "test")
        log.info("no split given for %d writers: %d to train, %d to test (train_writer_fraction=%s, split_seed=%s)",
                 len(free), n_train, len(free) - n_train, fraction, seed)
    return split


def format_rejections(rejected: pd.DataFrame, limit: int = 30) -> str:
    lines = [f"  {r.path}: {r.reason}" for r in rejected.head(limit).itertuples()]
    if len(rejected) > limit:
        lines.append(f"  ... and {len(rejected) - limit} more")
    return "\n".join(lines)


def build_index(name: str, settings: dict, index_path, rejected_path, generated_dir, *,
                on_bad_input: str = "stop", workers: int = 1) -> pd.DataFrame:
    """Run the dataset's adapter, check every image, and write the index and rejected tables."""
    generated = Path(generated_dir)
    generated.mkdir(parents=True, exist_ok=True)
    adapter = settings["adapter"]
    log.info("dataset %s: adapter %s", name, adapter)
    collected = ADAPTERS[adapter](settings, generated, workers)
    cands = collected.candidates
    sizes, bad = _inspect_all([c.path for c in cands], settings.get("empty_page_ink", 0.0005), workers,
                              Path(settings["root"]) if settings.get("root") else generated)
    rejected_rows = collected.rejected + bad

    rows, seen_ids = [], {}
    for c, size in zip(cands, sizes):
        if size is None:
            continue
        if c.doc_id in seen_ids:
            rejected_rows.append((str(c.path), f"duplicate document name {c.doc_id!r} (also {seen_ids[c.doc_id]})"))
            continue
        seen_ids[c.doc_id] = c.path
        rows.append({"doc_id": c.doc_id, "path": str(c.path), "writer": c.writer, "page": c.page,
                     "split": c.split, "width": size[0], "height": size[1], "ground_truth": c.ground_truth})
    index = pd.DataFrame(rows, columns=INDEX_SCHEMA.names)
    if len(index):
        index["split"] = assign_splits(index["writer"], index["split"], settings.get("train_writer_fraction", 0.5),
                                       settings.get("split_seed", 0))
        index = index.sort_values("doc_id", kind="stable").reset_index(drop=True)
    rejected = pd.DataFrame(rejected_rows, columns=REJECTED_SCHEMA.names).sort_values("path", kind="stable")

    if len(rejected):
        msg = f"dataset {name}: {len(rejected)} input file(s) rejected:\n{format_rejections(rejected)}"
        if on_bad_input == "stop":
            raise DatasetError(msg + "\nFix or remove these files, or set 'on_bad_input: skip' to record "
                                     "them in rejected.parquet and go on.")
        log.warning("%s\n(on_bad_input: skip; listed in %s)", msg, rejected_path)
    if index.empty:
        raise DatasetError(f"dataset {name}: no usable documents found under {settings.get('root', generated)}")
    both = set(index.loc[index.split == "train", "writer"]) & set(index.loc[index.split == "test", "writer"])
    if both:
        log.warning("dataset %s: %d writers appear in both train and test (e.g. %s)", name, len(both), sorted(both)[0])
    counts = index.groupby("split").agg(docs=("doc_id", "size"), writers=("writer", "nunique"))
    log.info("dataset %s: %d documents indexed, %d rejected; per split:\n%s", name, len(index), len(rejected),
             counts.to_string())
    write_parquet(index, index_path, INDEX_SCHEMA)
    write_parquet(rejected, rejected_path, REJECTED_SCHEMA)
    return pd.read_parquet(index_path)
