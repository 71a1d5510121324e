"""The synthetic compositional grammar (contract: /work/shared/PROMPTS.md): parse, format, sample, lay out, hold out.

A prompt is a `Spec`: a tuple of clauses joined by "and"; a clause is a `Group` (colour, shape, count) or a
`Relation` between two single objects. Every object is named exactly once, so the scene's objects are the clauses'
objects in order (`Spec.objects`), and relations refer to them by index (`Spec.relations`).
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

COLORS: dict[str, tuple[int, int, int]] = {
    # Chosen far apart in RGB (closest pairs ~127: yellow/orange, red/orange, purple/grey) so blurry samples classify.
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Each relation as its canonical twin: "A right of B" is "B left of A" (used to canonicalise and to flip).
_SWAP = {"to the right of": "to the left of", "below": "above"}
FLIP = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}
FORMS = {1: "single", 2: "count", 3: "pair", 4: "relation", 5: "complex"}
MAX_OBJECTS = 4
PROMPTS_DIR = Path(__file__).resolve().parents[1] / "eval" / "prompts"


@dataclass(frozen=True)
class Group:
    color: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Relation:
    a: Group
    relation: str
    b: Group


Clause = Group | Relation


@dataclass(frozen=True)
class Spec:
    clauses: tuple[Clause, ...]

    @property
    def objects(self) -> list[tuple[str, str]]:
        out = []
        for c in self.clauses:
            out += [(c.color, c.shape)] * c.count if isinstance(c, Group) else [(c.a.color, c.a.shape),
                                                                                 (c.b.color, c.b.shape)]
        return out

    @property
    def relations(self) -> list[tuple[int, str, int]]:
        """(index of A, relation, index of B) into `objects`."""
        out, i = [], 0
        for c in self.clauses:
            if isinstance(c, Relation):
                out.append((i, c.relation, i + 1))
                i += 2
            else:
                i += c.count
        return out

    @property
    def form(self) -> int:
        cl = self.clauses
        if len(cl) == 1:
            return 4 if isinstance(cl[0], Relation) else (1 if cl[0].count == 1 else 2)
        if len(cl) == 2 and all(isinstance(c, Group) and c.count == 1 for c in cl):
            return 3
        return 5

    @property
    def form_name(self) -> str:
        return FORMS[self.form]

    @property
    def split(self) -> str:
        return "complex" if self.form == 5 else "simple"

    @property
    def relation(self) -> str | None:
        """The scene's relation: None without one, the relation if all relation clauses share it, else "mixed"."""
        rels = {r for _, r, _ in self.relations}
        return None if not rels else rels.pop() if len(rels) == 1 else "mixed"


@dataclass
class Obj:
    color: str
    shape: str
    cx: float  # pixel coordinates, x right, y down; the shape's bounding box is [cx-r, cx+r] x [cy-r, cy+r]
    cy: float
    r: float


@dataclass
class Scene:
    objects: list[Obj]
    size: int
    caption: str
    form: str
    relation: str | None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | str) -> "Scene":
        d = json.loads(d) if isinstance(d, (str, bytes)) else d
        return cls(objects=[Obj(**o) for o in d["objects"]], size=int(d["size"]), caption=d["caption"],
                   form=d["form"], relation=d["relation"])


# ---------------------------------------------------------------- parse / format

def _article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def _format_group(g: Group) -> str:
    if g.count == 1:
        return f"{_article(g.color)} {g.color} {g.shape}"
    return f"{NUMBERS[g.count]} {g.color} {g.shape}s"


def format_spec(spec: Spec) -> str:
    """Canonical caption: "a"/"an" for one object (never "one"), plural nouns, clauses joined by " and "."""
    parts = []
    for c in spec.clauses:
        parts.append(_format_group(c) if isinstance(c, Group) else
                     f"{_format_group(c.a)} {c.relation} {_format_group(c.b)}")
    return " and ".join(parts)


def _parse_group(words: list[str], text: str) -> Group:
    if len(words) != 3:
        raise ValueError(f"expected '<count> <colour> <shape>', got {' '.join(words)!r} in {text!r}")
    cw, color, noun = words
    if cw not in COUNT_WORDS:
        raise ValueError(f"unknown count {cw!r} in {text!r} (use one of {sorted(COUNT_WORDS)})")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r} in {text!r} (use one of {list(COLORS)})")
    n = COUNT_WORDS[cw]
    shape = noun[:-1] if n > 1 else noun  # plural "circles" after two/three/four, singular after a/an/one
    if shape not in SHAPES or (n > 1 and not noun.endswith("s")):
        raise ValueError(f"unknown or mis-numbered shape {noun!r} in {text!r} "
                         f"({'plural' if n > 1 else 'singular'} of {list(SHAPES)} expected)")
    if cw in ("a", "an") and cw != _article(color):
        raise ValueError(f"wrong article in {text!r}: say '{_article(color)} {color}'")
    return Group(color, shape, n)


def parse_prompt(text: str) -> Spec:
    """Text → Spec; ValueError saying what is wrong for text outside the grammar. Case and spacing are forgiven."""
    norm = " ".join(str(text).lower().split())
    if not norm:
        raise ValueError("empty prompt")
    clauses: list[Clause] = []
    for part in norm.split(" and "):
        words = part.split()
        rel = next((r for r in RELATIONS if f" {r} " in f" {part} "), None)
        if rel is None:
            clauses.append(_parse_group(words, text))
            continue
        left, right = (f" {part} ").split(f" {rel} ", 1)
        a, b = _parse_group(left.split(), text), _parse_group(right.split(), text)
        if a.count != 1 or b.count != 1:
            raise ValueError(f"relations are between single objects, got {part!r} in {text!r}")
        clauses.append(Relation(a, rel, b))
    spec = Spec(tuple(clauses))
    if len(clauses) > 3:
        raise ValueError(f"at most three clauses joined by 'and', got {len(clauses)} in {text!r}")
    if len(spec.objects) > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects in all, got {len(spec.objects)} in {text!r}")
    return spec


def canonical_key(spec: Spec) -> tuple:
    """Identity of a prompt's meaning: clause order, "right of"/"below" vs their twins, and split groups
    ("a red circle and a red circle") don't matter. Held-out exclusion compares these keys, not strings."""
    groups: Counter = Counter()
    rels = []
    for c in spec.clauses:
        if isinstance(c, Group):
            groups[(c.color, c.shape)] += c.count
        else:
            a, r, b = (c.b, _SWAP[c.relation], c.a) if c.relation in _SWAP else (c.a, c.relation, c.b)
            rels.append(("r", a.color, a.shape, r, b.color, b.shape))
    return tuple(sorted([("g", c, s, n) for (c, s), n in groups.items()]) + sorted(rels))


# ---------------------------------------------------------------- sampling

def _cs(rng: random.Random) -> tuple[str, str]:
    return rng.choice(list(COLORS)), rng.choice(SHAPES)


def _distinct_clauses(spec: Spec) -> bool:
    """No colour+shape named in two clauses: a scene never has two look-alikes from different clauses, so which
    object a clause means is never ambiguous (a relation may still relate two look-alikes)."""
    seen: set = set()
    for c in spec.clauses:
        cs = {(c.color, c.shape)} if isinstance(c, Group) else {(c.a.color, c.a.shape), (c.b.color, c.b.shape)}
        if cs & seen:
            return False
        seen |= cs
    return True


def _sample_form(rng: random.Random, form: int) -> Spec:
    while True:
        if form in (1, 2):
            spec = Spec((Group(*_cs(rng), 1 if form == 1 else rng.choice((2, 3, 4))),))
        elif form == 3:
            spec = Spec((Group(*_cs(rng)), Group(*_cs(rng))))
        elif form == 4:
            spec = Spec((Relation(Group(*_cs(rng)), rng.choice(RELATIONS), Group(*_cs(rng))),))
        else:
            kinds = [rng.choice((1, 2, 4)) for _ in range(rng.choice((2, 3)))]
            if kinds.count(1) == len(kinds) == 2:
                continue  # that is form 3
            clauses: list[Clause] = []
            for k in kinds:
                if k == 4:
                    clauses.append(Relation(Group(*_cs(rng)), rng.choice(RELATIONS), Group(*_cs(rng))))
                else:
                    clauses.append(Group(*_cs(rng), 1 if k == 1 else rng.choice((2, 3))))
            spec = Spec(tuple(clauses))
            if len(spec.objects) > MAX_OBJECTS:
                continue
        if _distinct_clauses(spec):
            return spec


def sample_spec(rng: random.Random, complex_frac: float, exclude_heldout: bool = True) -> Spec:
    """A random prompt: complex (form 5) with probability complex_frac, else forms 1-4 evenly.
    Held-out evaluation prompts are resampled away (by meaning, see canonical_key) unless exclude_heldout=False."""
    keys = heldout_keys() if exclude_heldout else frozenset()
    while True:
        form = 5 if rng.random() < complex_frac else rng.choice((1, 2, 3, 4))
        spec = _sample_form(rng, form)
        if canonical_key(spec) not in keys:
            return spec


def corrupt_caption(spec: Spec, rng: random.Random, exclude_heldout: bool = True) -> Spec:
    """Label noise: change one object's colour or shape, or flip one relation. The result means something else
    (different canonical_key), stays in the grammar and, by default, outside the held-out set."""
    keys = heldout_keys() if exclude_heldout else frozenset()
    key0 = canonical_key(spec)
    for _ in range(1000):
        kinds = ["color", "shape"] + (["relation"] if spec.relations else [])
        kind = rng.choice(kinds)
        clauses = list(spec.clauses)
        i = rng.randrange(len(clauses))
        c = clauses[i]
        if kind == "relation":
            i = rng.choice([j for j, cl in enumerate(clauses) if isinstance(cl, Relation)])
            c = clauses[i]
            clauses[i] = Relation(c.a, FLIP[c.relation], c.b)
        else:
            def change(g: Group) -> Group:
                if kind == "color":
                    return Group(rng.choice([x for x in COLORS if x != g.color]), g.shape, g.count)
                return Group(g.color, rng.choice([x for x in SHAPES if x != g.shape]), g.count)
            if isinstance(c, Group):
                clauses[i] = change(c)
            elif rng.random() < 0.5:
                clauses[i] = Relation(change(c.a), c.relation, c.b)
            else:
                clauses[i] = Relation(c.a, c.relation, change(c.b))
        new = Spec(tuple(clauses))
        k = canonical_key(new)
        if k != key0 and k not in keys and _distinct_clauses(new):
            return new
    raise RuntimeError(f"could not corrupt {format_spec(spec)!r}")


# ---------------------------------------------------------------- layout

def _fits(o: Obj, placed: list[Obj], size: int, gap: float) -> bool:
    if o.cx - o.r < 1 or o.cy - o.r < 1 or o.cx + o.r > size - 1 or o.cy + o.r > size - 1:
        return False
    # Bounding boxes apart by `gap` along some axis: shapes never touch, even square corners.
    return all(max(abs(o.cx - p.cx), abs(o.cy - p.cy)) - (o.r + p.r) >= gap for p in placed)


def _holds(a: Obj, rel: str, b: Obj, margin: float) -> bool:
    d = {"to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx, "above": b.cy - a.cy,
         "below": a.cy - b.cy}[rel]
    return d >= margin * max(a.r, b.r)


# The smallest image side that lays out every spec: the gap between objects is at least 3 px, so below this a
# five-object complex scene cannot be placed (24 px held 10,000 scenes of each kind; 32 leaves a margin).
MIN_SIZE = 32


def check_room(size: int) -> None:
    """Below MIN_SIZE pixels a complex scene's objects cannot be placed apart (layout would give up after its tries)."""
    if size < MIN_SIZE:
        raise ValueError(f"the synthetic shapes need an image side ≥ {MIN_SIZE} px, got {size}")


def layout(spec: Spec, size: int, rng: random.Random, max_tries: int = 2000) -> Scene:
    """Place the spec's objects: inside the image, bounding boxes `gap` apart, diameters in [size/6, size/4]
    (so >= size/8 as the contract wants). A relation puts B along A's axis at least rA+rB+gap away (>= 1.5 radii)
    with a perpendicular offset under half a radius, so the relation holds with margin and no perpendicular
    relation does. Deterministic for a given rng state."""
    check_room(size)
    objs_cs, rels = spec.objects, spec.relations
    partner = {i: (rel, j) for i, rel, j in rels}
    gap = max(3.0, size / 20)
    for _ in range(max_tries):
        placed: list[Obj] = []
        i = 0
        while i < len(objs_cs):
            r = rng.uniform(size / 12, size / 8)
            ok = False
            for _ in range(50):
                cx, cy = rng.uniform(r + 1, size - 1 - r), rng.uniform(r + 1, size - 1 - r)
                o = Obj(*objs_cs[i], round(cx, 2), round(cy, 2), round(r, 2))
                if _fits(o, placed, size, gap):
                    ok = True
                    break
            if not ok:
                break
            if i in partner:  # place its relation partner B relative to A
                rel, j = partner[i]
                rb = round(rng.uniform(size / 12, size / 8), 2)
                ok = False
                for _ in range(50):
                    along = rng.uniform(o.r + rb + gap, size)
                    perp = rng.uniform(-0.45, 0.45) * min(o.r, rb)
                    sign = 1 if rel in ("to the left of", "above") else -1  # B is right of / below A
                    dx, dy = (sign * along, perp) if "left" in rel or "right" in rel else (perp, sign * along)
                    ob = Obj(*objs_cs[j], round(o.cx + dx, 2), round(o.cy + dy, 2), rb)
                    if _fits(ob, placed + [o], size, gap) and _holds(o, rel, ob, 1.5):
                        ok = True
                        break
                if not ok:
                    break
                placed += [o, ob]
                i += 2
            else:
                placed.append(o)
                i += 1
        if len(placed) == len(objs_cs) and not _ambiguous(placed, rels):
            return Scene(placed, size, format_spec(spec), spec.form_name, spec.relation)
    raise RuntimeError(f"could not lay out {format_spec(spec)!r} at size {size}")


def _ambiguous(objs: list[Obj], rels: list[tuple[int, str, int]]) -> bool:
    """True if a look-alike of A or B from another clause also (nearly) satisfies A's relation to B — then the
    image would not say which object the relation is about. Only possible for prompts with repeated colour+shape
    across clauses (never sampled, but parse_prompt accepts them, e.g. from a prompts file)."""
    for i, rel, j in rels:
        for k, o in enumerate(objs):
            if k in (i, j):
                continue
            same = (o.color, o.shape)
            if same == (objs[i].color, objs[i].shape) and _holds(o, rel, objs[j], 0.5):
                return True
            if same == (objs[j].color, objs[j].shape) and _holds(objs[i], rel, o, 0.5):
                return True
    return False


# ---------------------------------------------------------------- held-out evaluation sets

HELDOUT_SEED = 20250101
HELDOUT_SIMPLE_PER_FORM = {1: 4, 2: 12, 3: 16, 4: 32}  # few of form 1: there are only 24 such prompts in all


def make_heldout_sets(seed: int = HELDOUT_SEED, n_complex: int = 64, write: bool = True) -> tuple[list[str], list[str]]:
    """The evaluation prompts (64 simple, 64 complex), distinct in meaning; deterministic in `seed`.
    With write=True they go to fluxtrain/eval/prompts/{simple,complex}.txt (run once; the files are shipped)."""
    rng = random.Random(seed)
    seen: set = set()
    simple, complex_ = [], []

    def draw(form: int) -> str:
        while True:
            spec = _sample_form(rng, form)
            k = canonical_key(spec)
            if k not in seen:
                seen.add(k)
                return format_spec(spec)

    for form, n in HELDOUT_SIMPLE_PER_FORM.items():
        simple += [draw(form) for _ in range(n)]
    complex_ = [draw(5) for _ in range(n_complex)]
    if write:
        PROMPTS_DIR.mkdir(parents=True, exist_ok=True)
        (PROMPTS_DIR / "simple.txt").write_text("\n".join(simple) + "\n")
        (PROMPTS_DIR / "complex.txt").write_text("\n".join(complex_) + "\n")
    return simple, complex_


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and '#' comments skipped. A file that is not UTF-8 text is a ValueError."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8-sig").splitlines()]  # -sig: Notepad's BOM
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8, "
                         "one prompt a line") from None
    return [ln for ln in lines if ln and not ln.startswith("#")]


@functools.lru_cache(maxsize=1)
def _heldout() -> tuple[frozenset, frozenset]:
    texts = [p for name in ("simple.txt", "complex.txt") for p in read_prompts(PROMPTS_DIR / name)]
    specs = [parse_prompt(t) for t in texts]
    return frozenset(format_spec(s) for s in specs), frozenset(canonical_key(s) for s in specs)


def heldout_prompts() -> set[str]:
    """The held-out evaluation prompts, as canonical captions."""
    return set(_heldout()[0])


def heldout_keys() -> frozenset:
    return _heldout()[1]


def is_heldout(spec: Spec) -> bool:
    return canonical_key(spec) in heldout_keys()
