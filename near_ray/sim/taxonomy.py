"""Made-up taxonomies for the synthetic benchmark: family → genus → species, with names and attributes.

Each domain template says what kind of object it is (meta-class), which English head nouns its genera
take ("Warbler", "Lily"), and which visual attributes exist. The visual contract:

- a **family** fixes the coarse shape (continuous shape parameters drawn once per family);
- a **genus** fixes the main colour and the size, and a default value for every sibling axis;
- **siblings** (species of one genus) differ in exactly ONE attribute: the genus picks one sibling axis
  and gives each of its species a different value on it.

Names are plausible and made up: a canonical English name ("Crimson-barred Warbler"), synonyms
("Red-barred Warbler"), a Latin-ish scientific name ("Ochrothlypis fasciata"). Everything is drawn
from a numpy Generator seeded by (seed, domain), so a taxonomy is the same for the same seed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from near_ray.errors import NearRayError


class SynthError(NearRayError, ValueError):
    """Parameters the synthetic benchmark cannot be generated with; the message names the parameter."""


@dataclass(frozen=True)
class Colour:
    name: str  # the word used in English names ("Crimson")
    simple: str  # the plain word captions use ("red")
    latin: str  # a Latin epithet ("rubra")
    rgb: tuple[int, int, int]


PALETTE: tuple[Colour, ...] = (
    Colour("Crimson", "red", "rubra", (200, 30, 40)),
    Colour("Ochre", "yellow-brown", "ochracea", (204, 140, 40)),
    Colour("Azure", "blue", "caerulea", (40, 110, 220)),
    Colour("Olive", "olive-green", "olivacea", (110, 130, 40)),
    Colour("Violet", "purple", "violacea", (130, 60, 180)),
    Colour("Slate", "grey", "schistacea", (95, 105, 120)),
    Colour("Amber", "yellow", "flava", (240, 185, 20)),
    Colour("Rusty", "brown", "ferruginea", (150, 70, 30)),
    Colour("Teal", "blue-green", "thalassina", (20, 140, 140)),
    Colour("Rosy", "pink", "rosea", (235, 115, 160)),
    Colour("Ivory", "white", "eburnea", (238, 232, 212)),
    Colour("Sooty", "black", "fuliginosa", (35, 35, 40)),
    Colour("Emerald", "green", "smaragdina", (30, 160, 70)),
    Colour("Coral", "orange", "corallina", (245, 115, 60)),
)
# The ink each marking is drawn with: a value's own colour name, or the axis-specific ink below.
INK: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240), "black": (25, 25, 28), "yellow": (245, 215, 30), "red": (215, 30, 35),
    "dark": (45, 30, 35), "brown": (115, 70, 35), "green": (40, 150, 60), "blue": (40, 90, 230),
    "orange": (250, 130, 20), "grey": (140, 140, 145), "pale": (235, 225, 200),
}
AXIS_INK: dict[tuple[str, str], str] = {
    ("tail_pattern", "barred"): "dark", ("tail_pattern", "spotted"): "white", ("tail_pattern", "white-tipped"): "white",
    ("breast", "streaked"): "dark", ("breast", "spotted"): "dark",
}
SIZES: dict[str, float] = {"small": 0.8, "medium": 0.9, "large": 1.0}  # object scale relative to the frame


@dataclass(frozen=True)
class Axis:
    """A sibling attribute: its values, each with an English caption phrase and a short name word."""

    name: str
    values: tuple[str, ...]
    phrases: dict[str, str]  # value → caption phrase ("a barred tail")
    words: dict[str, str]  # value → name fragment ("barred"); "" for the plain/default value


@dataclass(frozen=True)
class DomainTemplate:
    name: str
    meta_class: str
    heads: tuple[str, ...]  # genus common names
    latin_suffixes: tuple[str, ...]  # genus Latin endings
    family_suffix: str  # "idae" for animals, "aceae" for plants and fungi
    axes: tuple[Axis, ...]
    shape_params: dict[str, tuple[float, float]]  # family shape parameter → range
    shape_kinds: tuple[str, ...]  # a categorical family shape ("forked" tail, "conical" cap, …)
    shape_phrases: dict[str, str]  # shape kind → caption phrase


def _axis(name: str, spec: dict[str, tuple[str, str]]) -> Axis:
    return Axis(name, tuple(spec), {v: p for v, (p, _) in spec.items()}, {v: w for v, (_, w) in spec.items()})


TEMPLATES: dict[str, DomainTemplate] = {
    "birds": DomainTemplate(
        name="birds",
        meta_class="bird",
        heads=("Warbler", "Finch", "Thrush", "Sparrow", "Tanager", "Wren", "Pipit", "Shrike", "Vireo", "Bunting",
               "Flycatcher", "Kinglet", "Oriole", "Grosbeak", "Swallow", "Lark", "Starling", "Babbler", "Robin",
               "Siskin", "Linnet", "Dipper", "Nuthatch", "Chat"),
        latin_suffixes=("thlypis", "spiza", "cola", "ornis", "phila", "cichla", "turdus", "lanius"),
        family_suffix="idae",
        axes=(
            _axis("tail_pattern", {"plain": ("a plain tail", ""), "barred": ("a barred tail", "barred"),
                                   "spotted": ("a spotted tail", "spot-tailed"),
                                   "white-tipped": ("a white-tipped tail", "white-tipped")}),
            _axis("wing_bar", {"none": ("plain wings", ""), "white": ("a white wing bar", "white-winged"),
                               "yellow": ("a yellow wing bar", "yellow-winged"),
                               "black": ("a black wing bar", "black-winged")}),
            _axis("crown", {"plain": ("a plain head", ""), "black": ("a black cap", "black-capped"),
                            "red": ("a red crown", "red-crowned"), "white": ("a white crown", "white-crowned")}),
            _axis("breast", {"plain": ("a plain breast", ""), "streaked": ("a streaked breast", "streaked"),
                             "spotted": ("a spotted breast", "speckled"), "pale": ("a pale breast", "pale-breasted")}),
        ),
        shape_params={"body_aspect": (1.35, 2.1), "tail_len": (0.3, 0.65), "beak_len": (0.12, 0.4),
                      "head_size": (0.22, 0.32)},
        shape_kinds=("pointed", "forked", "fan", "square"),
        shape_phrases={"pointed": "a pointed tail", "forked": "a forked tail", "fan": "a fanned tail",
                       "square": "a square tail"},
    ),
    "flowers": DomainTemplate(
        name="flowers",
        meta_class="flower",
        heads=("Lily", "Orchid", "Aster", "Poppy", "Iris", "Daisy", "Tulip", "Gentian", "Primrose", "Campion",
               "Anemone", "Bellflower", "Crocus", "Zinnia", "Dahlia", "Marigold", "Lotus", "Peony", "Phlox",
               "Clover", "Mallow", "Lupine", "Starwort", "Catchfly"),
        latin_suffixes=("anthus", "lirion", "phyllum", "petalum", "stemma", "flora", "gonum", "carpa"),
        family_suffix="aceae",
        axes=(
            _axis("petal_tip", {"plain": ("plain petals", ""), "white": ("white petal tips", "white-tipped"),
                                "dark": ("dark petal tips", "dark-tipped"),
                                "yellow": ("yellow petal tips", "gold-tipped")}),
            _axis("disk", {"yellow": ("a yellow centre", ""), "brown": ("a brown centre", "brown-eyed"),
                           "black": ("a black centre", "black-eyed"), "green": ("a green centre", "green-eyed")}),
            _axis("petal_stripe", {"none": ("unstriped petals", ""), "dark": ("a dark stripe on each petal", "striped"),
                                   "white": ("a white stripe on each petal", "white-veined"),
                                   "red": ("a red stripe on each petal", "red-veined")}),
            _axis("petal_spots", {"none": ("unspotted petals", ""), "dark": ("dark spots on the petals", "spotted"),
                                  "white": ("white spots on the petals", "pearl-spotted"),
                                  "red": ("red spots on the petals", "blood-spotted")}),
        ),
        shape_params={"petal_len": (0.5, 0.75), "petal_width": (0.12, 0.3), "disk_radius": (0.14, 0.26),
                      "stem_len": (0.0, 0.6)},
        shape_kinds=("5", "6", "8", "12"),
        shape_phrases={"5": "five petals", "6": "six petals", "8": "eight petals", "12": "many thin petals"},
    ),
    "mushrooms": DomainTemplate(
        name="mushrooms",
        meta_class="mushroom",
        heads=("Bolete", "Milkcap", "Brittlegill", "Webcap", "Inkcap", "Waxcap", "Parasol", "Fieldcap", "Bonnet",
               "Funnel", "Knight", "Rollrim", "Fibrecap", "Pinkgill", "Scalycap", "Toughshank", "Dapperling",
               "Chanterelle", "Puffcap", "Shield", "Woodtuft", "Mottlegill"),
        latin_suffixes=("myces", "porus", "cybe", "phora", "pilus", "lepis", "coma", "stroma"),
        family_suffix="aceae",
        axes=(
            _axis("cap_spots", {"none": ("a smooth cap", ""), "white": ("white spots on the cap", "white-spotted"),
                                "yellow": ("yellow spots on the cap", "gold-flecked"),
                                "dark": ("dark spots on the cap", "dark-scaled")}),
            _axis("stem_ring", {"none": ("a bare stem", ""), "white": ("a white ring on the stem", "white-ringed"),
                                "dark": ("a dark ring on the stem", "dark-ringed"),
                                "red": ("a red ring on the stem", "red-ringed")}),
            _axis("cap_rim", {"none": ("a plain cap edge", ""), "white": ("a white cap edge", "pale-rimmed"),
                              "dark": ("a dark cap edge", "dark-rimmed"), "yellow": ("a yellow cap edge", "gold-rimmed")}),
            _axis("stem_colour", {"white": ("a white stem", ""), "yellow": ("a yellow stem", "yellow-stemmed"),
                                  "brown": ("a brown stem", "brown-stemmed"), "grey": ("a grey stem", "grey-stemmed")}),
        ),
        shape_params={"cap_width": (0.6, 0.95), "cap_height": (0.25, 0.55), "stem_width": (0.1, 0.25),
                      "stem_len": (0.35, 0.7)},
        shape_kinds=("convex", "flat", "conical", "bell"),
        shape_phrases={"convex": "a rounded cap", "flat": "a flat cap", "conical": "a pointed cap",
                       "bell": "a bell-shaped cap"},
    ),
    "butterflies": DomainTemplate(
        name="butterflies",
        meta_class="butterfly",
        heads=("Hairstreak", "Skipper", "Fritillary", "Admiral", "Copper", "Ringlet", "Satyr", "Sulphur",
               "Swallowtail", "Emperor", "Heath", "Checkerspot", "Crescent", "Tortoiseshell", "Monarch",
               "Duskywing", "Elfin", "Glasswing", "Brimstone", "Jezebel"),
        latin_suffixes=("lycaena", "nympha", "ptera", "papilio", "colias", "thecla", "argynnis", "erebia"),
        family_suffix="idae",
        axes=(
            _axis("eyespots", {"none": ("no eyespots", ""), "black": ("black eyespots", "eyed"),
                               "blue": ("blue eyespots", "blue-eyed"), "orange": ("orange eyespots", "fire-eyed")}),
            _axis("wing_border", {"none": ("unbordered wings", ""), "black": ("a black wing border", "black-edged"),
                                  "white": ("a white wing border", "white-edged"),
                                  "brown": ("a brown wing border", "brown-edged")}),
            _axis("band", {"none": ("no band", ""), "white": ("a white band across the forewing", "white-banded"),
                           "yellow": ("a yellow band across the forewing", "yellow-banded"),
                           "black": ("a black band across the forewing", "black-banded")}),
            _axis("wing_tip", {"plain": ("plain wing tips", ""), "black": ("black wing tips", "black-tipped"),
                               "white": ("white wing tips", "white-tipped"),
                               "orange": ("orange wing tips", "orange-tipped")}),
        ),
        shape_params={"fore_len": (0.6, 0.9), "fore_width": (0.3, 0.45), "hind_len": (0.35, 0.6),
                      "hind_width": (0.3, 0.45)},
        shape_kinds=("rounded", "pointed", "tailed", "scalloped"),
        shape_phrases={"rounded": "rounded wings", "pointed": "pointed forewings", "tailed": "tailed hindwings",
                       "scalloped": "scalloped wings"},
    ),
}

GENUS_QUALIFIERS = ("Bush", "Reed", "Rock", "Marsh", "Wood", "Mountain", "Desert", "Forest", "River", "Cliff",
                    "Meadow", "Dune", "Moor", "Glade", "Shore", "Prairie")
SPECIES_PREFIXES = ("Lesser", "Greater", "Common", "Northern", "Southern", "Eastern", "Western", "Little", "Great",
                    "Royal", "Mountain", "Island")
PLACE_STARTS = ("Mar", "Hal", "Dun", "Bel", "Ash", "Tor", "Wen", "Kel", "Har", "Lin", "Cor", "Fen", "Os", "Ral",
                "Tam", "Ver")
PLACE_ENDS = ("wick", "more", "dale", "ton", "ford", "by", "ridge", "mouth", "haven", "field")
LATIN_SYLLABLES = ("ar", "bel", "cor", "dra", "el", "fen", "gal", "hel", "is", "lor", "mel", "nor", "or", "pal",
                   "quin", "ros", "sil", "tar", "ul", "ver", "xan", "zo", "chry", "leu", "ochr", "melan", "cyan")
LATIN_EPITHETS = ("peregrina", "minor", "major", "borealis", "australis", "montana", "silvestris", "palustris",
                  "elegans", "gracilis", "robusta", "fasciata", "maculata", "striata", "concolor", "varia",
                  "ornata", "pulchra", "modesta", "occidentalis", "orientalis", "sylvatica", "campestris",
                  "arenaria", "rupestris", "lutea", "nivalis", "vulgaris", "insignis", "obscura")


@dataclass
class Species:
    canonical: str
    synonyms: list[str]
    scientific_name: str
    genus: str  # Latin genus
    genus_common: str  # English genus head ("Warbler"): what a coarse answer says
    family: str  # Latin family
    attributes: dict[str, Any]  # every visual attribute: shape, colour, size, each sibling axis
    axis: str  # the sibling axis on which this species differs from its siblings
    attribute: str  # that difference, in words ("a barred tail")
    siblings: list[str] = field(default_factory=list)  # canonical names of the other species of its genus


@dataclass
class DomainTaxonomy:
    template: DomainTemplate
    species: list[Species]

    def to_json(self) -> dict[str, Any]:
        return {
            "meta_class": self.template.meta_class,
            "species": {
                s.canonical: {
                    "synonyms": s.synonyms,
                    "scientific_name": s.scientific_name,
                    "genus": s.genus,
                    "genus_common": s.genus_common,
                    "family": s.family,
                    "attribute": s.attribute,
                    "axis": s.axis,
                    "attributes": s.attributes,
                    "siblings": s.siblings,
                }
                for s in self.species
            },
        }


def domain_rng(seed: int, domain: str, *extra: int) -> np.random.Generator:
    """An independent, reproducible stream per (seed, domain, extra…): no global RNG state anywhere."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(domain.encode()), *extra])


def genus_sizes(species: int) -> list[int]:
    """Split ``species`` into genera of 2-3 siblings (a single genus of 2-3 for tiny domains)."""
    genera = max(1, math.ceil(species / 3))
    base, extra = divmod(species, genera)
    return [base + (1 if i < extra else 0) for i in range(genera)]


def _latin_root(rng: np.random.Generator, used: set[str]) -> str:
    for _ in range(1000):
        root = "".join(rng.choice(LATIN_SYLLABLES) for _ in range(int(rng.integers(1, 3))))
        if root not in used:
            used.add(root)
            return root
    raise SynthError("ran out of Latin genus names; use fewer species")


def _genus_heads(t: DomainTemplate, n: int, rng: np.random.Generator) -> list[str]:
    heads = list(rng.permutation(t.heads))
    out = heads[:n]
    quals = list(rng.permutation(GENUS_QUALIFIERS))
    i = 0
    while len(out) < n:  # more genera than head nouns: "Reed Warbler", "Bush Warbler", …
        out.append(f"{quals[(i // len(heads)) % len(quals)]} {heads[i % len(heads)]}")
        i += 1
        if i > len(heads) * len(quals):
            raise SynthError(f"species: too many genera for domain '{t.name}'")
    return out


def _place(rng: np.random.Generator) -> str:
    name = f"{rng.choice(PLACE_STARTS)}{rng.choice(PLACE_ENDS)}"
    return name + ("'s" if rng.random() < 0.4 else "")


def _species_names(colour: Colour, word: str, head: str, rng: np.random.Generator) -> tuple[str, list[str]]:
    """(canonical, synonyms) for one species; ``word`` names its sibling attribute value ("" = default)."""
    place = _place(rng)
    prefix = str(rng.choice(SPECIES_PREFIXES))
    if word:
        styles = [f"{colour.name} {word.capitalize()} {head}", f"{word.capitalize()} {head}",
                  f"{prefix} {word.capitalize()} {head}"]
        lead = f"{colour.simple.capitalize()} " if colour.simple not in word else f"{prefix} "
        syns = [f"{lead}{word.capitalize()} {head}", f"{place} {head}"]
    else:
        styles = [f"{prefix} {colour.name} {head}", f"{place} {head}", f"{colour.name} {head}"]
        syns = [f"{prefix} {colour.simple.capitalize()} {head}", f"{place} {colour.name} {head}"]
    canonical = str(styles[int(rng.integers(len(styles)))])
    return canonical, [s for s in syns if s.lower() != canonical.lower()]


def _family_shapes(t: DomainTemplate, n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Shape parameters per family, spread over their ranges so families look different."""
    kinds = list(rng.permutation(t.shape_kinds))
    shapes = []
    for f in range(n):
        shape: dict[str, Any] = {"shape": str(kinds[f % len(kinds)])}
        for j, (name, (lo, hi)) in enumerate(t.shape_params.items()):
            # A stratified draw per parameter (different strata order per parameter) spreads families out.
            strata = (f * (2 * j + 1) + j) % n
            u = (strata + rng.random()) / n
            shape[name] = round(lo + (hi - lo) * u, 4)
        shapes.append(shape)
    return shapes


def visible(axis: str, value: str, colour: Colour) -> bool:
    """Whether a marking of this value stands out from a body of this colour (a black cap on a black bird doesn't)."""
    ink = INK.get(AXIS_INK.get((axis, value), value))
    return ink is None or sum((a - b) ** 2 for a, b in zip(ink, colour.rgb, strict=True)) ** 0.5 > 110


def _sibling_values(t: DomainTemplate, colour: Colour, defaults: dict[str, str], size: int,
                    rng: np.random.Generator) -> tuple[Axis, list[str]]:
    """The axis a genus's species differ on and one value per species, each visible on the genus colour."""
    for k in rng.permutation(len(t.axes)):
        axis = t.axes[int(k)]
        ok = [v for v in axis.values if visible(axis.name, v, colour)]
        if defaults[axis.name] not in ok:
            defaults[axis.name] = ok[0] if ok else defaults[axis.name]
        others = [v for v in ok if v != defaults[axis.name]]
        if len(others) >= size - 1:
            return axis, [defaults[axis.name], *(str(v) for v in rng.permutation(others)[: size - 1])]
    raise SynthError(f"no visible sibling attribute for a {colour.name.lower()} genus of {size} in '{t.name}'")


def build_taxonomy(domain: str, species: int, seed: int) -> DomainTaxonomy:
    """The taxonomy of one domain: ``species`` species in genera of 2-3, genera grouped into families."""
    if domain not in TEMPLATES:
        raise SynthError(f"domains: unknown domain '{domain}'; known domains: {', '.join(sorted(TEMPLATES))}")
    t = TEMPLATES[domain]
    rng = domain_rng(seed, domain, 0)
    sizes = genus_sizes(species)
    n_families = max(1, round(math.sqrt(len(sizes))))
    shapes = _family_shapes(t, n_families, rng)
    heads = _genus_heads(t, len(sizes), rng)
    used_roots: set[str] = set()
    family_roots = [_latin_root(rng, used_roots) for _ in range(n_families)]
    used_names: set[str] = set()
    out: list[Species] = []
    colour_offset = int(rng.integers(len(PALETTE)))
    for g, size in enumerate(sizes):
        fam = g % n_families
        # Genera of one family take distinct colours (and sizes), so colour+size tells genera apart.
        colour = PALETTE[(colour_offset + g // n_families * 5 + fam * 3) % len(PALETTE)]
        size_name = list(SIZES)[(g // n_families + fam) % len(SIZES)]
        genus_latin = (_latin_root(rng, used_roots) + str(rng.choice(t.latin_suffixes))).capitalize()
        family_latin = family_roots[fam].capitalize() + t.family_suffix
        defaults = {a.name: str(rng.choice(a.values[:2])) for a in t.axes}
        axis, values = _sibling_values(t, colour, defaults, size, rng)
        epithets = rng.permutation(LATIN_EPITHETS)[:size]
        genus_species = []
        for i, value in enumerate(values):
            attrs = {**shapes[fam], "colour": colour.name.lower(), "size": size_name, **defaults, axis.name: str(value)}
            canonical, synonyms = _unique_names(colour, axis.words[value], heads[g], rng, used_names)
            genus_species.append(Species(
                canonical=canonical, synonyms=synonyms, scientific_name=f"{genus_latin} {epithets[i]}",
                genus=genus_latin, genus_common=heads[g], family=family_latin, attributes=attrs,
                axis=axis.name, attribute=axis.phrases[value],
            ))
        for s in genus_species:
            s.siblings = [o.canonical for o in genus_species if o is not s]
        out.extend(genus_species)
    return DomainTaxonomy(template=t, species=out)


def _unique_names(colour: Colour, word: str, head: str, rng: np.random.Generator,
                  used: set[str]) -> tuple[str, list[str]]:
    for _ in range(200):
        canonical, synonyms = _species_names(colour, word, head, rng)
        if canonical.lower() not in used:
            used.add(canonical.lower())
            keep = [s for s in synonyms if s.lower() not in used]
            used.update(s.lower() for s in keep)
            return canonical, keep
    raise SynthError(f"could not find a unique name for a species of genus '{head}'")
