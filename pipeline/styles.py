"""Styles, Fooocus 2.5's way.

`STYLE_NAMES` is the list Fooocus 2.5 accepts (GET /v1/engines/styles), in Fooocus's order:
"Fooocus V2" (prompt expansion), "Random Style", then the styles of its fooocus, sai, mre, twri,
diva and marc_k3nt3l files.

The project ships its own template for every one of those names (style_templates.json: a positive
template containing "{prompt}", or "" for the negative-only styles, and a negative prompt).
`StyleLibrary.from_folder` adds style files in Fooocus's JSON format (a list of
{"name", "prompt", "negative_prompt"}), so that a user who points it at a Fooocus `sdxl_styles`
folder gets exactly their styles."""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

STYLE_NAMES = (
    'Fooocus V2',
    'Random Style',
    'Fooocus Enhance',
    'Fooocus Semi Realistic',
    'Fooocus Sharp',
    'Fooocus Masterpiece',
    'Fooocus Photograph',
    'Fooocus Negative',
    'Fooocus Cinematic',
    'Fooocus Pony',
    'SAI 3D Model',
    'SAI Analog Film',
    'SAI Anime',
    'SAI Cinematic',
    'SAI Comic Book',
    'SAI Craft Clay',
    'SAI Digital Art',
    'SAI Enhance',
    'SAI Fantasy Art',
    'SAI Isometric',
    'SAI Line Art',
    'SAI Lowpoly',
    'SAI Neonpunk',
    'SAI Origami',
    'SAI Photographic',
    'SAI Pixel Art',
    'SAI Texture',
    'MRE Cinematic Dynamic',
    'MRE Spontaneous Picture',
    'MRE Artistic Vision',
    'MRE Dark Dream',
    'MRE Gloomy Art',
    'MRE Bad Dream',
    'MRE Underground',
    'MRE Surreal Painting',
    'MRE Dynamic Illustration',
    'MRE Undead Art',
    'MRE Elemental Art',
    'MRE Space Art',
    'MRE Ancient Illustration',
    'MRE Brave Art',
    'MRE Heroic Fantasy',
    'MRE Dark Cyberpunk',
    'MRE Lyrical Geometry',
    'MRE Sumi E Symbolic',
    'MRE Sumi E Detailed',
    'MRE Manga',
    'MRE Anime',
    'MRE Comic',
    'Ads Advertising',
    'Ads Automotive',
    'Ads Corporate',
    'Ads Fashion Editorial',
    'Ads Food Photography',
    'Ads Gourmet Food Photography',
    'Ads Luxury',
    'Ads Real Estate',
    'Ads Retail',
    'Artstyle Abstract',
    'Artstyle Abstract Expressionism',
    'Artstyle Art Deco',
    'Artstyle Art Nouveau',
    'Artstyle Constructivist',
    'Artstyle Cubist',
    'Artstyle Expressionist',
    'Artstyle Graffiti',
    'Artstyle Hyperrealism',
    'Artstyle Impressionist',
    'Artstyle Pointillism',
    'Artstyle Pop Art',
    'Artstyle Psychedelic',
    'Artstyle Renaissance',
    'Artstyle Steampunk',
    'Artstyle Surrealist',
    'Artstyle Typography',
    'Artstyle Watercolor',
    'Futuristic Biomechanical',
    'Futuristic Biomechanical Cyberpunk',
    'Futuristic Cybernetic',
    'Futuristic Cybernetic Robot',
    'Futuristic Cyberpunk Cityscape',
    'Futuristic Futuristic',
    'Futuristic Retro Cyberpunk',
    'Futuristic Retro Futurism',
    'Futuristic Sci Fi',
    'Futuristic Vaporwave',
    'Game Bubble Bobble',
    'Game Cyberpunk Game',
    'Game Fighting Game',
    'Game Gta',
    'Game Mario',
    'Game Minecraft',
    'Game Pokemon',
    'Game Retro Arcade',
    'Game Retro Game',
    'Game Rpg Fantasy Game',
    'Game Strategy Game',
    'Game Streetfighter',
    'Game Zelda',
    'Misc Architectural',
    'Misc Disco',
    'Misc Dreamscape',
    'Misc Dystopian',
    'Misc Fairy Tale',
    'Misc Gothic',
    'Misc Grunge',
    'Misc Horror',
    'Misc Kawaii',
    'Misc Lovecraftian',
    'Misc Macabre',
    'Misc Manga',
    'Misc Metropolis',
    'Misc Minimalist',
    'Misc Monochrome',
    'Misc Nautical',
    'Misc Space',
    'Misc Stained Glass',
    'Misc Techwear Fashion',
    'Misc Tribal',
    'Misc Zentangle',
    'Papercraft Collage',
    'Papercraft Flat Papercut',
    'Papercraft Kirigami',
    'Papercraft Paper Mache',
    'Papercraft Paper Quilling',
    'Papercraft Papercut Collage',
    'Papercraft Papercut Shadow Box',
    'Papercraft Stacked Papercut',
    'Papercraft Thick Layered Papercut',
    'Photo Alien',
    'Photo Film Noir',
    'Photo Glamour',
    'Photo Hdr',
    'Photo Iphone Photographic',
    'Photo Long Exposure',
    'Photo Neon Noir',
    'Photo Silhouette',
    'Photo Tilt Shift',
    'Cinematic Diva',
    'Abstract Expressionism',
    'Academia',
    'Action Figure',
    'Adorable 3D Character',
    'Adorable Kawaii',
    'Art Deco',
    'Art Nouveau',
    'Astral Aura',
    'Avant Garde',
    'Baroque',
    'Bauhaus Style Poster',
    'Blueprint Schematic Drawing',
    'Caricature',
    'Cel Shaded Art',
    'Character Design Sheet',
    'Classicism Art',
    'Color Field Painting',
    'Colored Pencil Art',
    'Conceptual Art',
    'Constructivism',
    'Cubism',
    'Dadaism',
    'Dark Fantasy',
    'Dark Moody Atmosphere',
    'Dmt Art Style',
    'Doodle Art',
    'Double Exposure',
    'Dripping Paint Splatter Art',
    'Expressionism',
    'Faded Polaroid Photo',
    'Fauvism',
    'Flat 2d Art',
    'Fortnite Art Style',
    'Futurism',
    'Glitchcore',
    'Glo Fi',
    'Googie Art Style',
    'Graffiti Art',
    'Harlem Renaissance Art',
    'High Fashion',
    'Idyllic',
    'Impressionism',
    'Infographic Drawing',
    'Ink Dripping Drawing',
    'Japanese Ink Drawing',
    'Knolling Photography',
    'Light Cheery Atmosphere',
    'Logo Design',
    'Luxurious Elegance',
    'Macro Photography',
    'Mandola Art',
    'Marker Drawing',
    'Medievalism',
    'Minimalism',
    'Neo Baroque',
    'Neo Byzantine',
    'Neo Futurism',
    'Neo Impressionism',
    'Neo Rococo',
    'Neoclassicism',
    'Op Art',
    'Ornate And Intricate',
    'Pencil Sketch Drawing',
    'Pop Art 2',
    'Rococo',
    'Silhouette Art',
    'Simple Vector Art',
    'Sketchup',
    'Steampunk 2',
    'Surrealism',
    'Suprematism',
    'Terragen',
    'Tranquil Relaxing Atmosphere',
    'Sticker Designs',
    'Vibrant Rim Light',
    'Volumetric Lighting',
    'Watercolor 2',
    'Whimsical And Playful',
    'Mk Chromolithography',
    'Mk Cross Processing Print',
    'Mk Dufaycolor Photograph',
    'Mk Herbarium',
    'Mk Punk Collage',
    'Mk Mosaic',
    'Mk Van Gogh',
    'Mk Coloring Book',
    'Mk Singer Sargent',
    'Mk Pollock',
    'Mk Basquiat',
    'Mk Andy Warhol',
    'Mk Halftone Print',
    'Mk Gond Painting',
    'Mk Albumen Print',
    'Mk Aquatint Print',
    'Mk Anthotype Print',
    'Mk Inuit Carving',
    'Mk Bromoil Print',
    'Mk Calotype Print',
    'Mk Color Sketchnote',
    'Mk Cibulak Porcelain',
    'Mk Alcohol Ink Art',
    'Mk One Line Art',
    'Mk Blacklight Paint',
    'Mk Carnival Glass',
    'Mk Cyanotype Print',
    'Mk Cross Stitching',
    'Mk Encaustic Paint',
    'Mk Embroidery',
    'Mk Gyotaku',
    'Mk Luminogram',
    'Mk Lite Brite Art',
    'Mk Mokume Gane',
    'Pebble Art',
    'Mk Palekh',
    'Mk Suminagashi',
    'Mk Scrimshaw',
    'Mk Shibori',
    'Mk Vitreous Enamel',
    'Mk Ukiyo E',
    'Mk Vintage Airline Poster',
    'Mk Vintage Travel Poster',
    'Mk Bauhaus Style',
    'Mk Afrofuturism',
    'Mk Atompunk',
    'Mk Constructivism',
    'Mk Chicano Art',
    'Mk De Stijl',
    'Mk Dayak Art',
    'Mk Fayum Portrait',
    'Mk Illuminated Manuscript',
    'Mk Kalighat Painting',
    'Mk Madhubani Painting',
    'Mk Pictorialism',
    'Mk Pichwai Painting',
    'Mk Patachitra Painting',
    'Mk Samoan Art Inspired',
    'Mk Tlingit Art',
    'Mk Adnate Style',
    'Mk Ron English Style',
    'Mk Shepard Fairey Style',
)
EXPANSION_STYLE = "Fooocus V2"
RANDOM_STYLE = "Random Style"

PROMPT_PLACEHOLDER = "{prompt}"
TEMPLATES_PATH = Path(__file__).with_name("style_templates.json")

# Fooocus's own style files, in the order it loads them (after any other file in the folder), with
# how many of STYLE_NAMES each holds.
FOOOCUS_STYLE_FILES = (
    ("sdxl_styles_fooocus.json", 8),
    ("sdxl_styles_sai.json", 17),
    ("sdxl_styles_mre.json", 22),
    ("sdxl_styles_twri.json", 89),
    ("sdxl_styles_diva.json", 79),
    ("sdxl_styles_marc_k3nt3l.json", 62),
)


class Style(NamedTuple):
    prompt: str  # template with "{prompt}", or "" (the style adds only a negative)
    negative_prompt: str


def normalize_style_name(name: str) -> str:
    """Fooocus's key for a style file entry: '-' -> ' ', each space-separated word capitalised
    (first letter upper, the rest lower), then '3d'->'3D', 'Sai'->'SAI', 'Mre'->'MRE', '(s'->'(S'."""
    words = name.replace("-", " ").split(" ")
    key = " ".join(w[:1].upper() + w[1:].lower() for w in words)
    for old, new in (("3d", "3D"), ("Sai", "SAI"), ("Mre", "MRE"), ("(s", "(S")):
        key = key.replace(old, new)
    return key


def read_style_file(path: str | Path) -> list[tuple[str, Style]]:
    """The (normalised name, Style) entries of one Fooocus-format style file, in file order. Like
    Fooocus, a broken file is reported and whatever was read before the error is kept; a missing
    "prompt" or "negative_prompt" is ""."""
    entries: list[tuple[str, Style]] = []
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for entry in data:
            prompt = entry.get("prompt", "")
            negative = entry.get("negative_prompt", "")
            entries.append((normalize_style_name(entry["name"]), Style(prompt or "", negative or "")))
    except Exception as exc:  # noqa: BLE001 - Fooocus skips any unreadable style file
        log.warning("failed to load style file %s: %s", path, exc)
    return entries


def files_in_fooocus_order(folder: str | Path, extension: str) -> list[str]:
    """Relative paths of the files under `folder` whose extension (lower-cased) is `extension`, in
    the order Fooocus lists a folder: sub-folders before their parent (bottom-up), files of one
    folder sorted case-insensitively (sibling folders sorted the same way here, for determinism)."""
    root = Path(folder)
    out: list[str] = []

    def walk(directory: Path, rel: str) -> None:
        entries = sorted(directory.iterdir(), key=lambda p: p.name.casefold())
        for sub in entries:
            if sub.is_dir():
                walk(sub, f"{rel}{sub.name}/")
        for f in entries:
            if f.is_file() and f.suffix.lower() == extension:
                out.append(f"{rel}{f.name}")

    walk(root, "")
    return out


class StyleLibrary:
    """An ordered name -> Style mapping. The order matters: "Random Style" draws
    `rng.choice(names)` from it, as Fooocus does over its style dict."""

    def __init__(self, styles: Mapping[str, Style] | Iterable[tuple[str, Style]]):
        items = styles.items() if isinstance(styles, Mapping) else styles
        self._styles: dict[str, Style] = {}
        for name, style in items:
            self._styles[name] = Style(*style)

    @classmethod
    def builtin(cls) -> StyleLibrary:
        """The project's own templates for the 277 names of STYLE_NAMES, in that order."""
        return _builtin_library()

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> StyleLibrary:
        """The built-in styles plus the Fooocus-format *.json files under `folder` (None or a
        missing folder: the built-in styles). Files load in Fooocus's order - other files first,
        then its six own files in their fixed order - with an entry of a user file always
        replacing a built-in template of the same name. Where the folder lacks one of Fooocus's
        six files, the built-in styles of that file stand in at its place, so a full Fooocus
        `sdxl_styles` folder reproduces Fooocus's styles, order included."""
        builtin = _builtin_library()
        if folder is None or not Path(folder).is_dir():
            return builtin
        root = Path(folder)
        files = files_in_fooocus_order(root, ".json")
        own = {name for name, _ in FOOOCUS_STYLE_FILES}
        groups = _builtin_groups()
        order: dict[str, None] = {}
        user: dict[str, Style] = {}
        for rel in [f for f in files if f not in own] + [name for name, _ in FOOOCUS_STYLE_FILES]:
            if rel in files:
                for name, style in read_style_file(root / rel):
                    user[name] = style
                    order.setdefault(name)
            for name in groups.get(rel, ()):  # built-ins the user's file does not define
                order.setdefault(name)
        return cls((name, user[name] if name in user else builtin[name]) for name in order)

    @property
    def names(self) -> tuple[str, ...]:
        """Style names with a template, in library order."""
        return tuple(self._styles)

    @property
    def legal_names(self) -> tuple[str, ...]:
        """Every name a request may select: "Fooocus V2", "Random Style" and the styles."""
        return (EXPANSION_STYLE, RANDOM_STYLE, *self._styles)

    def is_legal(self, name: str) -> bool:
        return name in (EXPANSION_STYLE, RANDOM_STYLE) or name in self._styles

    def __contains__(self, name: object) -> bool:
        return name in self._styles

    def __getitem__(self, name: str) -> Style:
        return self._styles[name]

    def __len__(self) -> int:
        return len(self._styles)

    def random_style(self, rng: random.Random) -> str:
        """Fooocus's "Random Style": one draw of `rng.choice` over all styles, in library order."""
        return rng.choice(list(self._styles))

    def apply(self, name: str, prompt: str) -> tuple[list[str], list[str], bool]:
        """(positive lines, negative lines, whether the template had "{prompt}"): the template with
        "{prompt}" replaced by `prompt`, and the negative, each split into lines."""
        style = self._styles[name]
        return (style.prompt.replace(PROMPT_PLACEHOLDER, prompt).splitlines(),
                style.negative_prompt.splitlines(), PROMPT_PLACEHOLDER in style.prompt)


@lru_cache(maxsize=1)
def _builtin_library() -> StyleLibrary:
    data = json.loads(TEMPLATES_PATH.read_text(encoding="utf-8"))
    return StyleLibrary((name, Style(e.get("prompt") or "", e.get("negative_prompt") or ""))
                        for name, e in data.items())


@lru_cache(maxsize=1)
def _builtin_groups() -> dict[str, tuple[str, ...]]:
    """Fooocus style file name -> the built-in names it holds (consecutive runs of STYLE_NAMES)."""
    groups, start = {}, 2
    for file_name, count in FOOOCUS_STYLE_FILES:
        groups[file_name] = STYLE_NAMES[start:start + count]
        start += count
    return groups
