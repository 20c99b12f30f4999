"""Font discovery for the glyph dataset.

The default font set is matplotlib's bundled DejaVu and STIX families: a pip
dependency, so every machine with the same matplotlib renders the same dataset.
System fonts (e.g. Debian's fonts-noto) widen it but make it machine-dependent, so
they are opt-in and part of the cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Fonts whose cmap lies: a last-resort font claims every codepoint, the STIX size
# and non-Unicode variants hold only delimiter pieces or private-use glyphs, and the
# Computer Modern fonts use TeX encodings mapped onto ASCII codepoints.
_EXCLUDE_PREFIXES = ("LastResort", "STIXSiz", "STIXNonUni", "cm")
_SYSTEM_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")


@dataclass(frozen=True)
class Font:
    path: str
    name: str
    codepoints: frozenset[int]


def matplotlib_font_paths() -> list[Path]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(root.glob("*.ttf"))


def system_font_paths() -> list[Path]:
    found: list[Path] = []
    for directory in _SYSTEM_DIRS:
        root = Path(directory)
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf")]
    return sorted(found)


def discover_fonts(system_fonts: bool = False) -> list[Font]:
    """Usable fonts with their character coverage, deduplicated by file name."""
    paths = matplotlib_font_paths() + (system_font_paths() if system_fonts else [])
    return load_fonts(path for path in paths if not path.name.startswith(_EXCLUDE_PREFIXES))


def load_fonts(paths: Iterable[Path]) -> list[Font]:
    """Fonts at ``paths`` with their character maps; the first file of a name wins.

    A font that cannot be parsed is skipped: one broken system font must not stop a build.
    """
    from fontTools.ttLib import TTFont

    fonts: dict[str, Font] = {}
    for path in paths:
        if path.name in fonts:
            continue
        try:
            with TTFont(path, lazy=True) as tt:
                cmap = tt.getBestCmap() or {}
        except Exception:  # a broken system font must not stop the build
            continue
        fonts[path.name] = Font(str(path), path.stem, frozenset(cmap))
    return list(fonts.values())


def fingerprint(fonts: list[Font]) -> str:
    """Identity of a font set: file names and sizes (contents change sizes in practice)."""
    return fingerprint_paths(Path(font.path) for font in fonts)


def fingerprint_paths(paths: Iterable[Path]) -> str:
    """:func:`fingerprint` from the files alone, without parsing a font."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]
