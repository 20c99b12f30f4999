"""The decoder against the malformed-image corpus (reliability/corpus.py) and hypothesis
mutations of its seeds: every file is decoded or refused with ImageError, nothing else.

This is the fixed-seed CI subset of ``python -m reliability.fuzz`` (docs/RELIABILITY.md):
the whole corpus at the decode layer, a few hundred mutations.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from reliability.corpus import Sample, build
from reliability.fuzz import Tally, check_decode, mutated
from server.matching.imaging import ImageError, ImageLimits, decode

LIMITS = ImageLimits(max_bytes=300_000, max_pixels=1_000_000)  # the e2e servers' limits


@pytest.fixture(scope="module")
def corpus() -> list[Sample]:
    return build(seed=0)


def test_the_corpus_is_deterministic_and_covers_every_pillow_format(corpus) -> None:
    Image.init()
    assert set(Image.OPEN) | set(Image.SAVE) <= {s.source for s in corpus}
    assert {s.kind for s in corpus} == {"seed", "truncated", "mutated", "header", "bomb"}
    again = build(seed=0)
    assert [(s.name, s.data) for s in again] == [(s.name, s.data) for s in corpus]
    names = {s.name for s in corpus}
    assert "TIFF-L/tag273-type=2" in names  # issue 12: StripOffsets typed as ASCII


def test_every_corpus_file_is_decoded_or_refused(corpus) -> None:
    tally = Tally()
    for sample in corpus:
        check_decode(sample, LIMITS, tally)
    assert tally.failures == []
    statuses = {status for (_, status) in tally.counts}
    assert statuses == {"decoded", "refused"}  # both happen: the check can tell them apart


def test_bombs_are_refused_from_their_header(corpus) -> None:
    bombs = [s for s in corpus if s.kind == "bomb"]
    assert len(bombs) >= 10
    for sample in bombs:
        for limits in (LIMITS, ImageLimits()):  # the tests' limits and the defaults
            with pytest.raises(ImageError, match=r"pixels, the limit|decompression bomb"):
                decode(sample.data, 1, limits)


@pytest.fixture(scope="module")
def seeds(corpus) -> list[Sample]:
    return [s for s in corpus if s.kind == "seed"]


def test_hypothesis_mutations_are_decoded_or_refused(seeds) -> None:
    tally = Tally()

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(mutated(seeds))
    def property_holds(sample: Sample) -> None:
        check_decode(sample, LIMITS, tally)
        assert tally.failures == [], tally.failures

    property_holds()
    assert sum(tally.counts.values()) == 300
