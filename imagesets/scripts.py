"""Which tenant a character belongs to, by Unicode block.

Blocks give tenants with genuinely different statistics (letters of one alphabet are
confusable with each other in ways arrows are not), which is what per-dataset
threshold drift needs in order to be measurable.
"""

from __future__ import annotations

import unicodedata

# (first, last, tenant); first match wins, everything else is "symbols".
_BLOCKS: tuple[tuple[int, int, str], ...] = (
    (0x0030, 0x0039, "latin"),  # digits travel with the Latin letters
    (0x0041, 0x005A, "latin"),
    (0x0061, 0x007A, "latin"),
    (0x00C0, 0x024F, "latin"),  # Latin-1 letters, Extended-A/B
    (0x1E00, 0x1EFF, "latin"),
    (0x2C60, 0x2C7F, "latin"),
    (0xA720, 0xA7FF, "latin"),
    (0x0250, 0x02FF, "ipa"),  # IPA extensions, spacing modifier letters
    (0x1D00, 0x1DBF, "ipa"),  # phonetic extensions
    (0x0370, 0x03FF, "greek"),
    (0x1F00, 0x1FFF, "greek"),
    (0x0400, 0x052F, "cyrillic"),
    (0x2DE0, 0x2DFF, "cyrillic"),
    (0xA640, 0xA69F, "cyrillic"),
    (0x2200, 0x22FF, "math"),
    (0x27C0, 0x27EF, "math"),
    (0x2980, 0x2AFF, "math"),
    (0x1D400, 0x1D7FF, "math"),
    (0x2190, 0x21FF, "arrows"),
    (0x27F0, 0x27FF, "arrows"),
    (0x2900, 0x297F, "arrows"),
    (0x2B00, 0x2BFF, "arrows"),
    (0x2500, 0x25FF, "shapes"),  # box drawing, block elements, geometric shapes
)

TENANTS = ("latin", "greek", "cyrillic", "ipa", "math", "arrows", "shapes", "symbols")

# Categories that do not draw a standalone glyph: marks, separators, controls, private.
_SKIP_CATEGORIES = {"Mn", "Mc", "Me", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"}


def tenant_of(codepoint: int) -> str:
    for first, last, tenant in _BLOCKS:
        if first <= codepoint <= last:
            return tenant
    return "symbols"


def is_drawable(codepoint: int) -> bool:
    """True for characters that render as a glyph of their own."""
    return unicodedata.category(chr(codepoint)) not in _SKIP_CATEGORIES
