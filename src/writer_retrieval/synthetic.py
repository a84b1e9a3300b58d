"""Synthetic handwriting pages for writer-retrieval benchmarks.

A page collection in the layout of ICDAR2017 Historical-WI: ``{split}/{writer}-IMG_MAX_{pageid}.jpg``
(colour page) plus ``ground_truth/{writer}-IMG_MAX_{pageid}.png`` (the ink the pen laid on that page,
1-bit, ink = 1).

Writer identity lives in the shape of the strokes, as in real handwriting:

- a writer (:class:`WriterStyle`) has a base stroke face (Hershey fonts) plus an occasional second
  face for some letters, slant, letter width, ascender/descender proportions, letter and word
  spacing, baseline drift, line spacing and margins, pen width and a broad-nib angle/contrast;
- every glyph a writer uses is bent by its own smooth random displacement field, seeded by
  (seed, writer, character): these are the writer's allographs and the main identity cue;
- every glyph *instance* on a page gets a further small smooth deformation and jitter of position,
  scale and slant (strength grows with ``difficulty``);
- page appearance (paper tint, texture, illumination, stains, bleed-through, ink colour and
  opacity, blur, noise) is drawn per page from ranges shared by all writers, so that no global
  statistic such as mean gray or page colour gives the writer away.

Everything is deterministic: random numbers come from numpy Generators seeded with
``np.random.SeedSequence`` over (seed, purpose, writer[, page or character]); no global RNG state.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import math
import multiprocessing
import numbers
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from .imaging import write_gray, write_mask

__all__ = ["generate_collection", "WriterStyle", "make_writer_style", "render_word_mask",
           "render_page", "FACES", "PAGE_ID_BASE"]

# Hershey faces that look like writing, and those whose lowercase letters join up.
FACES = ("cursive", "scripts", "scriptc", "futural", "timesi", "rowmans")
_JOINED_FACES = frozenset({"cursive", "scripts"})
_FALLBACK_FACE = "futural"
# The faces' own slant (dx/dy of the stems) and width, so that a writer's slant and width
# parameters mean the same thing whichever face they write with.
_FACE_SLANT = {"cursive": 0.25, "scripts": 0.25, "scriptc": 0.25, "futural": 0.0, "timesi": 0.22,
               "rowmans": 0.0}
_FACE_WIDTH = {"cursive": 0.8, "scripts": 0.8, "scriptc": 0.8, "futural": 1.0, "timesi": 0.88,
               "rowmans": 1.0}

PAGE_ID_BASE = 100000
_WORDS_FILE = Path(__file__).with_name("data") / "words.txt"

# Domain tags for the SeedSequence entropy, so that streams for different purposes never collide.
_TAG_WRITER, _TAG_GLYPH, _TAG_PAGE, _TAG_WORD = 1, 2, 3, 4

_MAX_SEG = 0.07      # longest polyline segment, in x-heights, before deformation
_SHIFT = 4           # fractional bits for cv2 drawing coordinates


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class WriterStyle:
    """Everything that is constant for one writer. Lengths are in x-heights unless noted."""

    seed: int
    writer: str
    face: str                 # main Hershey face
    alt_face: str             # face some letters are taken from instead
    alt_prob: float           # share of letters (fixed per letter) taken from alt_face
    x_height: float           # fraction of the page height
    line_spacing: float       # baseline-to-baseline distance
    width: float              # horizontal scale of the letters
    slant: float              # shear dx/dy of upright strokes (positive leans right)
    ascender: float           # height of ascenders (b, d, h, k, l) above the x-line
    descender: float          # depth of descenders (g, j, p, q, y) below the baseline
    letter_spacing: float     # added to every advance
    word_spacing: float
    drift_amp: float          # baseline wobble amplitude
    drift_freq: float         # baseline wobble, cycles per text-line width
    line_skew: float          # mean slope of the lines (radians, positive = rising to the right)
    pen_width: float          # nib width
    nib_angle: float          # radians
    nib_contrast: float       # 0 = round pen, towards 1 = broad nib with hairlines
    smoothing: int            # corner rounding passes applied to the skeletons
    allograph: float          # strength of the per-letter deformation
    joined: bool              # joins lowercase letters (joined faces only)
    left_margin: float        # fractions of the page width / height
    right_margin: float
    top_margin: float
    bottom_margin: float
    indent: float             # paragraph indent


def _writer_key(writer: str) -> int:
    writer = str(writer)
    return int(writer) if writer.isdigit() else zlib.crc32(writer.encode("utf-8")) + 2**40


@functools.lru_cache(maxsize=4096)
def make_writer_style(seed: int, writer: str) -> WriterStyle:
    """Draw the style of `writer` (deterministic in seed and writer)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _TAG_WRITER, _writer_key(writer)]))
    u = rng.uniform
    face = FACES[int(rng.integers(len(FACES)))]
    alt_face = FACES[int(rng.integers(len(FACES)))]
    round_pen = rng.random() < 0.4
    contrast = float(u(0.25, 0.75))
    return WriterStyle(
        seed=int(seed), writer=str(writer), face=face, alt_face=alt_face,
        alt_prob=float(u(0.0, 0.25)),
        x_height=float(1.0 / u(48.0, 60.0)),
        line_spacing=float(u(2.5, 3.1)),
        width=float(u(0.8, 1.2)),
        slant=float(u(-0.15, 0.5)),
        ascender=float(u(0.7, 1.2)),
        descender=float(u(0.6, 1.1)),
        letter_spacing=float(u(-0.08, 0.25)),
        word_spacing=float(u(0.75, 1.5)),
        drift_amp=float(u(0.0, 0.22)),
        drift_freq=float(u(0.3, 1.5)),
        line_skew=float(rng.normal(0.0, 0.01)),
        pen_width=float(u(0.10, 0.15)),
        nib_angle=float(u(0.0, math.pi)),
        nib_contrast=0.0 if round_pen else contrast,
        smoothing=int(rng.integers(0, 3)),
        allograph=float(u(0.85, 1.2)),
        joined=bool(rng.random() < 0.8),
        left_margin=float(u(0.04, 0.13)),
        right_margin=float(u(0.03, 0.07)),
        top_margin=float(u(0.04, 0.08)),
        bottom_margin=float(u(0.04, 0.07)),
        indent=float(u(1.5, 5.0)),
    )


# --------------------------------------------------------------------------------------------
# Glyph skeletons
# --------------------------------------------------------------------------------------------

class _Glyph(NamedTuple):
    pts: np.ndarray      # (N, 2) float64, x-heights; origin at the left edge on the baseline, y down
    start: np.ndarray    # (N,) bool, True where a new stroke begins
    advance: float
    entry: int           # index of the point a joining stroke arrives at, -1 if none
    exit: int            # index of the point a joining stroke leaves from, -1 if none


@functools.lru_cache(maxsize=None)
def _face_glyphs(face: str) -> dict[str, tuple[tuple[np.ndarray, ...], float]]:
    """Strokes of every glyph of a Hershey face in x-height units (baseline y = 0, x-line y = -1,
    left edge x = 0) and the advance width."""
    from HersheyFonts import HersheyFonts

    font = HersheyFonts()
    font.load_default_font(face)
    glyphs = font.all_glyphs
    ys = [p[1] for s in glyphs["x"].strokes for p in s]
    x_line, baseline = min(ys), max(ys)
    xh = float(baseline - x_line)
    out = {}
    for ch, g in glyphs.items():
        strokes = []
        for s in g.strokes:
            a = np.asarray(s, dtype=np.float64).reshape(-1, 2)
            if len(a) == 0:
                continue
            if len(a) == 1:
                a = np.vstack([a, a + [0.5, 0.0]])
            a = np.column_stack([(a[:, 0] - g.left_offset) / xh, (a[:, 1] - baseline) / xh])
            strokes.append(a)
        out[ch] = (tuple(strokes), float(g.char_width) / xh)
    return out


@functools.lru_cache(maxsize=None)
def _face_extents(face: str) -> tuple[float, float]:
    """Ascender height above the x-line and descender depth below the baseline, in x-heights."""
    glyphs = _face_glyphs(face)
    asc = -min(float(s[:, 1].min()) for c in "bdhkl" for s in glyphs[c][0]) - 1.0
    desc = max(float(s[:, 1].max()) for c in "gjpqy" for s in glyphs[c][0])
    return max(asc, 0.2), max(desc, 0.2)


def _glyph_source(face: str, ch: str) -> tuple[tuple[np.ndarray, ...], float, str]:
    glyphs = _face_glyphs(face)
    if ch in glyphs:
        return (*glyphs[ch], face)
    fallback = _face_glyphs(_FALLBACK_FACE)
    if ch in fallback:
        return (*fallback[ch], _FALLBACK_FACE)
    return (*fallback["?"], _FALLBACK_FACE)


def _chaikin(a: np.ndarray, passes: int) -> np.ndarray:
    """Corner cutting that keeps the end points (rounds the pen's turns)."""
    for _ in range(passes):
        if len(a) < 3:
            break
        q = 0.75 * a[:-1] + 0.25 * a[1:]
        r = 0.25 * a[:-1] + 0.75 * a[1:]
        mid = np.empty((2 * (len(a) - 1), 2))
        mid[0::2], mid[1::2] = q, r
        a = np.vstack([a[:1], mid[1:-1], a[-1:]])
    return a


def _subdivide(a: np.ndarray, max_seg: float) -> np.ndarray:
    """Split every segment longer than max_seg, keeping the original vertices."""
    d = np.hypot(*np.diff(a, axis=0).T)
    n = np.maximum(1, np.ceil(d / max_seg).astype(int))
    if n.max() == 1:
        return a
    t = np.concatenate([np.arange(k) / k for k in n])
    i = np.repeat(np.arange(len(a) - 1), n)
    out = a[i] + (a[i + 1] - a[i]) * t[:, None]
    return np.vstack([out, a[-1:]])


def _smooth_field(rng: np.random.Generator, k: int, amp: float, freq: tuple[float, float]):
    """Parameters of a random smooth 2-D displacement: k plane waves with random directions."""
    theta = rng.uniform(0, 2 * math.pi, k)
    f = rng.uniform(*freq, k)
    wave = np.column_stack([np.cos(theta), np.sin(theta)]) * f[:, None] * 2 * math.pi
    phase = rng.uniform(0, 2 * math.pi, k)
    disp_dir = rng.uniform(0, 2 * math.pi, k)
    a = rng.uniform(0.4, 1.0, k) * amp
    disp = np.column_stack([np.cos(disp_dir), np.sin(disp_dir)]) * a[:, None]
    return wave, phase, disp


def _apply_field(p: np.ndarray, field) -> np.ndarray:
    wave, phase, disp = field
    return p + np.sin(p @ wave.T + phase) @ disp


def _build_glyph(style: WriterStyle, ch: str) -> _Glyph:
    """The writer's allograph of `ch`: its skeleton, deformed by the writer's habits."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [style.seed, _TAG_GLYPH, _writer_key(style.writer), ord(ch[0]) if ch else 0]))
    # Draw every random number up front, in a fixed order, so that branches cannot shift streams.
    use_alt = rng.random() < style.alt_prob
    affine = rng.normal(0.0, 0.07, 4) * style.allograph
    field = _smooth_field(rng, 3, 0.11 * style.allograph, (0.25, 0.8))
    bend = rng.normal(0.0, 0.04) * style.allograph
    width_factor = math.exp(rng.normal(0.0, 0.07))
    advance_extra = rng.normal(0.0, 0.04)

    face = style.alt_face if use_alt and ch.isalpha() else style.face
    strokes, advance, face = _glyph_source(face, ch)
    if not strokes:                       # space and friends
        return _Glyph(np.zeros((0, 2)), np.zeros(0, bool), advance * _FACE_WIDTH[face] * style.width,
                      -1, -1)

    asc, desc = _face_extents(face)
    centre = np.array([advance / 2.0, -0.5])
    a = np.array([[1 + affine[0], affine[1]], [affine[2], 1 + affine[3]]])
    out, start = [], []
    for s in strokes:
        s = _subdivide(_chaikin(s, style.smoothing), _MAX_SEG)
        y = s[:, 1]
        # the writer's ascender / descender proportions, whatever the face's own
        y = np.where(y < -1.0, -1.0 + (y + 1.0) * (style.ascender / asc), y)
        y = np.where(y > 0.0, y * (style.descender / desc), y)
        p = np.column_stack([s[:, 0], y]) - centre
        p = p @ a.T
        p = _apply_field(p, field)
        p[:, 0] += bend * p[:, 1] ** 2
        p += centre
        out.append(p)
        flag = np.zeros(len(p), bool)
        flag[0] = True
        start.append(flag)
    pts = np.vstack(out)
    starts = np.concatenate(start)
    width = _FACE_WIDTH[face] * style.width * width_factor
    slant = style.slant - _FACE_SLANT[face]
    pts[:, 0] = pts[:, 0] * width - slant * pts[:, 1]
    adv = advance * width + advance_extra

    entry = exit_ = -1
    if face in _JOINED_FACES and ch.islower():
        # A join arrives at a stroke start near the left edge at mid x-height, and leaves from a
        # stroke end near the right edge; the raw skeleton decides, the deformation moves them.
        first = np.flatnonzero(starts)
        last = np.append(first[1:] - 1, len(pts) - 1)
        raw_starts = [s[0] for s in strokes]
        raw_ends = [s[-1] for s in strokes]
        for k, q in enumerate(raw_starts):
            if q[0] < 0.3 and -0.9 < q[1] < -0.1:
                entry = int(first[k])
                break
        for k in range(len(raw_ends) - 1, -1, -1):
            q = raw_ends[k]
            if q[0] > advance - 0.3 and -0.9 < q[1] < -0.1:
                exit_ = int(last[k])
                break
    return _Glyph(pts, starts, adv, entry, exit_)


class _GlyphSet:
    """A writer's allographs, built on first use."""

    def __init__(self, style: WriterStyle):
        self.style = style
        self._glyphs: dict[str, _Glyph] = {}

    def __getitem__(self, ch: str) -> _Glyph:
        g = self._glyphs.get(ch)
        if g is None:
            g = self._glyphs[ch] = _build_glyph(self.style, ch)
        return g


@functools.lru_cache(maxsize=64)
def _glyph_set(style: WriterStyle) -> _GlyphSet:
    return _GlyphSet(style)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _words() -> tuple[tuple[str, ...], np.ndarray]:
    words = tuple(w.strip() for w in _WORDS_FILE.read_text(encoding="utf-8").splitlines()
                  if w.strip() and not w.startswith("#"))
    # The list is ordered roughly by frequency: a Zipf-like weighting gives natural-looking text.
    rank = np.arange(len(words), dtype=np.float64)
    p = 1.0 / (rank + 12.0)
    return words, p / p.sum()


def _tokens(rng: np.random.Generator) -> Iterator[tuple[str, bool]]:
    """Endless text: (word, paragraph_ends_after_it)."""
    words, p = _words()
    while True:
        n = int(rng.integers(4, 15))
        picks = rng.choice(len(words), size=n, p=p)
        comma_at = int(rng.integers(1, n - 1)) if rng.random() < 0.35 else -1
        for k, i in enumerate(picks):
            w = words[i]
            if k == 0:
                w = w[0].upper() + w[1:]
            if rng.random() < 0.015:
                w = str(int(rng.integers(1, 2000)))
            if k == comma_at:
                w += ","
            last = k == n - 1
            if last:
                w += "." if rng.random() < 0.9 else "?!;"[int(rng.integers(3))]
            yield w, last and rng.random() < 0.15


# --------------------------------------------------------------------------------------------
# Layout and instance variation
# --------------------------------------------------------------------------------------------

class _Placed(NamedTuple):
    glyph: _Glyph
    x: float            # pixel position of the glyph origin
    y: float            # pixel position of the baseline (before drift)
    line: int
    word: int
    join_prev: bool     # a joining stroke comes from the previous glyph


def _variability(difficulty: float) -> float:
    return 0.25 + 0.75 * float(difficulty)


def _word_glyphs(gs: _GlyphSet, word: str) -> list[_Glyph]:
    return [gs[ch] for ch in word]


def _word_width(glyphs: list[_Glyph], style: WriterStyle, xh: float) -> float:
    return sum(g.advance + style.letter_spacing for g in glyphs) * xh


def _place_word(glyphs, style, x, y, line, xh, rng, var, out: list[_Placed]) -> float:
    """Append the word's glyphs at pen position (x, y); return the pen position after it."""
    prev = None
    word = out[-1].word + 1 if out else 0
    jitter = rng.normal(0.0, 0.035 * var, len(glyphs))
    for g, j in zip(glyphs, jitter):
        if len(g.pts):
            join = (style.joined and prev is not None and prev.exit >= 0 and g.entry >= 0)
            out.append(_Placed(g, x, y, line, word, join))
            prev = g
        else:
            prev = None
        x += (g.advance + style.letter_spacing + j) * xh
    return x


def _instance_params(rng: np.random.Generator, n: int, var: float, word_of: np.ndarray):
    """Per glyph-instance jitter (scale, slant, offset) and smooth deformation fields."""
    n_words = int(word_of.max()) + 1 if n else 0
    w_scale = rng.normal(0.0, 0.03 * var, n_words)
    w_slant = rng.normal(0.0, 0.035 * var, n_words)
    w_dy = rng.normal(0.0, 0.04 * var, n_words)
    scale = np.exp(rng.normal(0.0, 0.035 * var, n) + w_scale[word_of])
    slant = rng.normal(0.0, 0.04 * var, n) + w_slant[word_of]
    dy = rng.normal(0.0, 0.03 * var, n) + w_dy[word_of]
    dx = rng.normal(0.0, 0.02 * var, n)
    k = 2
    theta = rng.uniform(0, 2 * math.pi, (n, k))
    freq = rng.uniform(0.35, 1.0, (n, k)) * 2 * math.pi
    wave = np.stack([np.cos(theta) * freq, np.sin(theta) * freq], axis=-1)       # (n, k, 2)
    phase = rng.uniform(0, 2 * math.pi, (n, k))
    ang = rng.uniform(0, 2 * math.pi, (n, k))
    amp = rng.uniform(0.0, 0.05 * var, (n, k))
    disp = np.stack([np.cos(ang) * amp, np.sin(ang) * amp], axis=-1)              # (n, k, 2)
    return scale, slant, dx, dy, wave, phase, disp


def _strokes_to_segments(placed: list[_Placed], style: WriterStyle, xh: float, rng, var: float,
                         line_drift) -> tuple[np.ndarray, np.ndarray]:
    """Pixel segments (M, 2, 2) and their direction angles for the placed glyphs."""
    if not placed:
        return np.zeros((0, 2, 2)), np.zeros(0)
    lens = np.array([len(p.glyph.pts) for p in placed])
    gid = np.repeat(np.arange(len(placed)), lens)
    pts = np.vstack([p.glyph.pts for p in placed])
    start = np.concatenate([p.glyph.start for p in placed])
    ox = np.array([p.x for p in placed])
    oy = np.array([p.y for p in placed])
    line = np.array([p.line for p in placed])
    word_of = np.array([p.word for p in placed])
    scale, slant, dx, dy, wave, phase, disp = _instance_params(rng, len(placed), var, word_of)

    # smooth per-instance deformation around the glyph centre
    c = np.column_stack([np.array([p.glyph.advance for p in placed]) / 2.0, np.full(len(placed), -0.5)])
    q = pts - c[gid]
    arg = np.einsum("nd,nkd->nk", q, wave[gid]) + phase[gid]
    q = q + np.einsum("nk,nkd->nd", np.sin(arg), disp[gid])
    q[:, 0] -= slant[gid] * q[:, 1]
    q *= scale[gid, None]
    q += c[gid]
    X = ox[gid] + (q[:, 0] + dx[gid]) * xh
    Y = oy[gid] + (q[:, 1] + dy[gid]) * xh
    Y = Y + line_drift(X, line[gid])
    P = np.column_stack([X, Y])

    valid = ~start[1:]
    segs = np.stack([P[:-1][valid], P[1:][valid]], axis=1)
    # joining strokes between the letters of a word
    firsts = np.r_[0, np.cumsum(lens)[:-1]]
    joins = [(firsts[i - 1] + placed[i - 1].glyph.exit, firsts[i] + placed[i].glyph.entry)
             for i in range(1, len(placed)) if placed[i].join_prev]
    if joins:
        a, b = np.array(joins).T
        ok = np.hypot(*(P[b] - P[a]).T) < 1.2 * xh
        a, b = a[ok], b[ok]
        if len(a):
            # a gently sagging curve rather than a straight bar
            t = np.linspace(0.0, 1.0, 6)[None, :, None]
            mid_sag = np.array([0.0, 0.12 * xh])
            curve = P[a][:, None] * (1 - t) + P[b][:, None] * t + mid_sag * (4 * t * (1 - t))
            js = np.stack([curve[:, :-1], curve[:, 1:]], axis=2).reshape(-1, 2, 2)
            segs = np.concatenate([segs, js])
    d = segs[:, 1] - segs[:, 0]
    return segs, np.arctan2(d[:, 1], d[:, 0])


def _render_segments(segs: np.ndarray, angle: np.ndarray, style: WriterStyle, pen_px: float,
                     shape: tuple[int, int], ss: int) -> np.ndarray:
    """Ink coverage in [0, 1] (float32) of the segments drawn with a (broad-nib) pen."""
    h, w = shape
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    if len(segs):
        c = style.nib_contrast
        width = pen_px * ((1.0 - c) + c * np.abs(np.sin(angle - style.nib_angle)))
        width = np.maximum(width, 0.55)
        thick = np.clip(np.rint(width * ss), 1, 255).astype(np.int32)
        # pixel (i, j) covers [j, j+1) x [i, i+1); cv2 integer coordinates are pixel centres
        pts = np.rint((segs * ss - 0.5) * (1 << _SHIFT))
        pts = np.clip(pts, -(1 << 28), 1 << 28).astype(np.int32)
        for t in np.unique(thick):
            sel = pts[thick == t]
            cv2.polylines(canvas, sel, False, 255, thickness=int(t), lineType=cv2.LINE_8, shift=_SHIFT)
    if ss == 1:
        return canvas.astype(np.float32) / 255.0
    small = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def _supersampling(w: int, h: int) -> int:
    return 3 if w * h <= 4_500_000 else 2


def _layout_text(style: WriterStyle, rng: np.random.Generator, w: int, h: int, difficulty: float):
    """Lay out running text over a page; return (placed glyphs, line drift function, x-height px,
    pen width px)."""
    var = _variability(difficulty)
    gs = _glyph_set(style)
    # x-height follows the page height, unless the page is so narrow that words would not fit
    xh = style.x_height * min(h, 1.6 * w) * math.exp(rng.normal(0.0, 0.04))
    # the writer's pen, but pens (and how they are held) change from page to page
    pen_px = style.pen_width * xh * math.exp(rng.normal(0.0, 0.15))
    left = (style.left_margin + rng.normal(0.0, 0.008)) * w
    right = w - (style.right_margin + abs(rng.normal(0.0, 0.01))) * w
    top = (style.top_margin + abs(rng.normal(0.0, 0.01))) * h
    bottom = h - style.bottom_margin * h
    pitch = style.line_spacing * xh
    above = (1.0 + style.ascender) * xh        # tallest letters above the baseline
    below = style.descender * xh               # deepest descenders
    drift_room = (style.drift_amp * 1.3 + 0.1) * xh + abs(style.line_skew) * w

    text_rng, jitter_rng, line_rng = rng.spawn(3)
    tokens = _tokens(text_rng)
    placed: list[_Placed] = []
    dropped = 0
    y = top + above + drift_room
    line = 0
    pending = None
    indent = 0.0
    while y + below + drift_room <= bottom:
        x = left + indent + rng.normal(0.0, 0.15) * xh * var
        x_start = x
        n_words = 0
        paragraph_end = False
        while True:
            if pending is None:
                pending = next(tokens)
            word, par_end = pending
            glyphs = _word_glyphs(gs, word)
            ww = _word_width(glyphs, style, xh)
            if x + ww > right and n_words > 0:
                break
            if x + ww > right and ww > right - x_start and dropped < 50:
                pending = None                              # a word longer than a line: drop it
                dropped += 1
                continue
            x = _place_word(glyphs, style, x, y, line, xh, jitter_rng, var, placed)
            x += (style.word_spacing + rng.normal(0.0, 0.12 * var)) * xh
            n_words += 1
            pending = None
            if par_end:
                paragraph_end = True
                break
        indent = style.indent * xh if paragraph_end else 0.0
        y += pitch * math.exp(rng.normal(0.0, 0.03 * var))
        line += 1

    n_lines = max(line, 1)
    amp = style.drift_amp * xh * line_rng.uniform(0.6, 1.3, (n_lines, 2)) * np.array([1.0, 0.4])
    freq = style.drift_freq * line_rng.uniform(0.7, 1.4, (n_lines, 2)) * np.array([1.0, 2.7])
    phase = line_rng.uniform(0, 2 * math.pi, (n_lines, 2))
    skew = style.line_skew + line_rng.normal(0.0, 0.006 * var, n_lines)
    span = max(right - left, 1.0)

    def drift(x: np.ndarray, ln: np.ndarray) -> np.ndarray:
        u = (x - left) / span
        wob = (amp[ln] * np.sin(2 * math.pi * freq[ln] * u[:, None] + phase[ln])).sum(axis=1)
        return wob - skew[ln] * (x - left)

    return placed, drift, xh, pen_px, jitter_rng


def _render_text(style: WriterStyle, rng: np.random.Generator, w: int, h: int, difficulty: float,
                 ss: int) -> np.ndarray:
    placed, drift, xh, pen_px, jitter_rng = _layout_text(style, rng, w, h, difficulty)
    segs, angle = _strokes_to_segments(placed, style, xh, jitter_rng, _variability(difficulty), drift)
    return _render_segments(segs, angle, style, max(pen_px, 0.9), (h, w), ss)


def render_word_mask(style: WriterStyle, word: str, *, x_height: float = 32.0,
                     difficulty: float = 0.0, rng: np.random.Generator | None = None,
                     coverage: bool = False) -> np.ndarray:
    """Render one word as `style` writes it, cropped to the ink (1 px border).

    With `rng`, the word is one instance with the per-instance variability of `difficulty`;
    without, it is the writer's plain allographs. Returns the ink mask (coverage >= 0.5), or the
    coverage itself (float32 in [0, 1]) with ``coverage=True``.
    """
    if rng is None:
        rng = np.random.default_rng(np.random.SeedSequence([style.seed, _TAG_WORD, 0]))
        var = 0.0
    else:
        var = _variability(difficulty)
    gs = _glyph_set(style)
    glyphs = _word_glyphs(gs, word)
    width = _word_width(glyphs, style, x_height)
    margin = 4.0 * x_height
    w = int(math.ceil(width + 2 * margin))
    h = int(math.ceil(7.0 * x_height))
    baseline = 4.0 * x_height
    placed: list[_Placed] = []
    _place_word(glyphs, style, margin, baseline, 0, x_height, rng, var, placed)
    segs, angle = _strokes_to_segments(placed, style, x_height, rng, var,
                                       lambda x, ln: np.zeros_like(x))
    cov = _render_segments(segs, angle, style, max(style.pen_width * x_height, 0.9), (h, w), 3)
    ys, xs = np.nonzero(cov >= 0.5)
    if len(ys) == 0:
        return np.zeros((1, 1), np.float32 if coverage else bool)
    cov = cov[max(ys.min() - 1, 0):ys.max() + 2, max(xs.min() - 1, 0):xs.max() + 2]
    return cov if coverage else cov >= 0.5


# --------------------------------------------------------------------------------------------
# Paper and degradation
# --------------------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean unit-ish smooth noise with features about `cell` pixels across."""
    gh = max(2, int(math.ceil(h / cell)) + 2)
    gw = max(2, int(math.ceil(w / cell)) + 2)
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _ink_colour(rng: np.random.Generator) -> np.ndarray:
    """Ink colour (multiplicative filter, RGB in [0, 1]); the same range for every writer."""
    kind = rng.integers(3)
    dark = rng.uniform(0.0, 0.12)
    if kind == 0:       # black / gray
        rgb = np.full(3, 0.10) + rng.normal(0, 0.015, 3)
    elif kind == 1:     # blue-black
        rgb = np.array([0.12, 0.14, 0.30]) + rng.normal(0, 0.02, 3)
    else:               # iron-gall brown
        rgb = np.array([0.30, 0.20, 0.12]) + rng.normal(0, 0.02, 3)
    return np.clip(rgb + dark, 0.02, 0.5).astype(np.float32)


def _paper(rng: np.random.Generator, h: int, w: int, d: float) -> np.ndarray:
    """Paper: tint, texture, illumination and stains; float32 RGB in [0, 1]."""
    # smooth fields are computed at quarter resolution and upsampled once
    sh, sw = max(2, h // 4), max(2, w // 4)
    lum = 1.0 + (0.015 + 0.04 * d) * _smooth_noise(rng, sh, sw, sh / 3.0)
    lum += (0.006 + 0.015 * d) * _smooth_noise(rng, sh, sw, 6.0)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    yy, xx = yy / sh - 0.5, xx / sw - 0.5
    ang = rng.uniform(0, 2 * math.pi)
    lum *= 1.0 - rng.uniform(0.0, 0.04 + 0.12 * d) * (np.cos(ang) * xx + np.sin(ang) * yy + 0.5)
    lum *= 1.0 - rng.uniform(0.0, 0.05 + 0.15 * d) * (xx ** 2 + yy ** 2) * 2.0
    stain = np.zeros((sh, sw, 3), np.float32)
    for _ in range(int(rng.poisson(0.3 + 3.0 * d))):
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        r = rng.uniform(0.02, 0.12) * (1.0 + rng.uniform(0.0, 0.8, 2))
        rot = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(rot) + (yy - cy) * math.sin(rot)
        v = -(xx - cx) * math.sin(rot) + (yy - cy) * math.cos(rot)
        rr = np.sqrt((u / r[0]) ** 2 + (v / r[1]) ** 2)
        rr = rr * (1.0 + 0.25 * _smooth_noise(rng, sh, sw, sh / 8.0))
        blob = 1.0 / (1.0 + np.exp((rr - 1.0) * rng.uniform(4.0, 12.0)))
        if rng.random() < 0.4:          # tide mark of a dried drop
            blob = blob * 0.5 + np.exp(-((rr - 1.0) / 0.08) ** 2)
        strength = rng.uniform(0.03, 0.10) * (0.4 + d)
        stain += (strength * blob)[..., None] * np.array([0.55, 0.8, 1.0], np.float32)
    small = lum[..., None] * (1.0 - np.clip(stain, 0.0, 0.6))
    page = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    # tint: light paper, more yellow with age (per page, never per writer)
    base = rng.uniform(0.83, 0.96) - rng.uniform(0.0, 0.08) * d
    yellow = rng.uniform(0.0, 0.05) + rng.uniform(0.0, 0.12) * d
    tint = base * np.array([1.0, 1.0 - 0.45 * yellow, 1.0 - yellow], np.float32)
    tint = np.clip(tint + rng.normal(0.0, 0.01, 3).astype(np.float32), 0.0, 1.0)
    grain = rng.standard_normal((h, w), dtype=np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 0.7) * (0.012 + 0.03 * d)
    page *= tint
    page *= (1.0 + grain)[..., None]
    return page


def render_page(style: WriterStyle, ss_page: np.random.SeedSequence, width: int, height: int,
                difficulty: float) -> tuple[np.ndarray, np.ndarray]:
    """Render one page: (RGB uint8 image, bool ink mask)."""
    text_ss, paper_ss, ink_ss, bleed_ss, noise_ss = ss_page.spawn(5)
    d = float(difficulty)
    ss = _supersampling(width, height)
    cov = _render_text(style, np.random.default_rng(text_ss), width, height, d, ss)
    mask = cov >= 0.5

    page = _paper(np.random.default_rng(paper_ss), height, width, d)
    brng = np.random.default_rng(bleed_ss)
    if brng.random() < 0.75 * d:
        # the writing on the back of the leaf, mirrored and diffused through the paper
        back = _render_text(style, brng, width, height, d, 1)[:, ::-1]
        sigma = (brng.uniform(1.5, 3.0) * width / 1000.0) + 0.7
        back = cv2.GaussianBlur(np.ascontiguousarray(back), (0, 0), sigma)
        strength = brng.uniform(0.04, 0.06 + 0.14 * d)
        page *= 1.0 - (strength * back)[..., None] * np.array([0.7, 0.8, 0.95], np.float32)

    irng = np.random.default_rng(ink_ss)
    ink = _ink_colour(irng)
    opacity = irng.uniform(0.82, 1.0) - 0.12 * d * irng.random()
    op_field = np.clip(opacity + (0.03 + 0.06 * d) * _smooth_noise(irng, height, width, 40.0), 0.4, 1.0)
    alpha = cov * op_field
    page *= 1.0 - alpha[..., None] * (1.0 - ink)

    nrng = np.random.default_rng(noise_ss)
    page = cv2.GaussianBlur(page, (0, 0), nrng.uniform(0.3, 0.45 + 0.5 * d))
    sigma = nrng.uniform(0.003, 0.006 + 0.012 * d)
    page += nrng.standard_normal(page.shape, dtype=np.float32) * np.float32(sigma)
    img = np.clip(page * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img, mask


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------

class _PageTask(NamedTuple):
    jpg: str
    png: str
    writer: str
    page_index: int
    width: int
    height: int
    difficulty: float
    seed: int
    jpeg_quality: int


def _run_task(task: _PageTask) -> str:
    style = make_writer_style(task.seed, task.writer)
    ss = np.random.SeedSequence([task.seed, _TAG_PAGE, _writer_key(task.writer), task.page_index])
    img, mask = render_page(style, ss, task.width, task.height, task.difficulty)
    write_gray(task.jpg, img, jpeg_quality=task.jpeg_quality)
    write_mask(task.png, mask)
    return task.jpg


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def generate_collection(out_dir, *, writers: int, pages_per_writer: int, train_writers: int,
                        page_width: int, page_height: int, difficulty: float, seed: int,
                        jpeg_quality: int = 90, workers: int = 1, progress: bool = True):
    """Generate a synthetic writer-retrieval collection under `out_dir`.

    Writers "1".."writers"; writers 1..train_writers form the "train" split, the others "test".
    Each page is written as ``{split}/{writer}-IMG_MAX_{pageid}.jpg`` (RGB JPEG) with its ink mask
    ``ground_truth/{writer}-IMG_MAX_{pageid}.png``. Returns a DataFrame with columns
    path, ink_mask, writer, page, split, sorted by path. The same arguments give byte-identical
    files whatever `workers` is.
    """
    import pandas as pd

    writers = _count("writers", writers, 1)
    pages_per_writer = _count("pages_per_writer", pages_per_writer, 1)
    train_writers = _count("train_writers", train_writers, 0)
    if train_writers >= writers:
        raise ValueError(f"train_writers must be < writers (leave at least one test writer), "
                         f"got train_writers={train_writers}, writers={writers}")
    page_width = _count("page_width", page_width, 200)
    page_height = _count("page_height", page_height, 200)
    seed = _count("seed", seed, 0)
    jpeg_quality = _count("jpeg_quality", jpeg_quality, 1)
    if jpeg_quality > 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    workers = _count("workers", workers, 1)
    if isinstance(difficulty, bool) or not isinstance(difficulty, numbers.Real) \
            or not math.isfinite(difficulty) or not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be a number in [0, 1], got {difficulty!r}")
    difficulty = float(difficulty)

    out = Path(out_dir)
    tasks, rows = [], []
    for wi in range(1, writers + 1):
        writer = str(wi)
        split = "train" if wi <= train_writers else "test"
        for p in range(pages_per_writer):
            stem = f"{writer}-IMG_MAX_{PAGE_ID_BASE + (wi - 1) * pages_per_writer + p}"
            jpg = str(out / split / f"{stem}.jpg")
            png = str(out / "ground_truth" / f"{stem}.png")
            tasks.append(_PageTask(jpg, png, writer, p, page_width, page_height, difficulty, seed,
                                   jpeg_quality))
            rows.append({"path": jpg, "ink_mask": png, "writer": writer, "page": stem, "split": split})
    for sub in ("train", "test", "ground_truth"):
        if sub != "train" or train_writers > 0:
            (out / sub).mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=len(tasks), desc="synthetic pages", unit="page", disable=not progress)
    try:
        if workers == 1 or len(tasks) == 1:
            for task in tasks:
                _run_task(task)
                bar.update(1)
        else:
            # spawn, not fork: OpenCV's thread pool does not survive fork() once the parent has
            # used it (opencv/opencv#5150). Spawned workers import the caller's main module, so a
            # calling script needs the usual `if __name__ == "__main__":` guard.
            ctx = multiprocessing.get_context("spawn")
            try:
                with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                                            initializer=_worker_init) as pool:
                    futures = [pool.submit(_run_task, t) for t in tasks]
                    for fut in cf.as_completed(futures):
                        fut.result()
                        bar.update(1)
            except cf.process.BrokenProcessPool as exc:
                raise RuntimeError(
                    "a page-rendering worker process died. Worker processes are spawned: a script "
                    "calling generate_collection(workers > 1) must do so under "
                    "`if __name__ == '__main__':` (or use workers=1)") from exc
    finally:
        bar.close()

    df = pd.DataFrame(rows, columns=["path", "ink_mask", "writer", "page", "split"])
    return df.sort_values("path", kind="stable").reset_index(drop=True)
