"""regcore.surfaces: the pattern areas, a box's surface in closed form, the weighted percentile."""

from __future__ import annotations

import math

import numpy as np
import pytest

from regcore.surfaces import SURFACE_AREA_BY_CODE, robust_hausdorff_vox, surface_elements


def test_pattern_areas_in_closed_form():
    # corner v inside (bit v): one corner cut off by a triangle through 3 edge midpoints,
    # side sqrt(2)/2 -> sqrt(3)/8; two corners along an edge: a sqrt(2)/2 x 1 rectangle; four
    # corners of a face: the unit square halfway; nothing or everything inside: no surface
    assert SURFACE_AREA_BY_CODE[0] == 0.0 and SURFACE_AREA_BY_CODE[255] == 0.0
    for v in range(8):
        assert SURFACE_AREA_BY_CODE[1 << v] == pytest.approx(math.sqrt(3) / 8)
        assert SURFACE_AREA_BY_CODE[255 ^ (1 << v)] == pytest.approx(math.sqrt(3) / 8)
    assert SURFACE_AREA_BY_CODE[0b11] == pytest.approx(math.sqrt(2) / 2)
    assert SURFACE_AREA_BY_CODE[0b1111] == pytest.approx(1.0)
    # two diagonal corners of a face are cut off separately
    assert SURFACE_AREA_BY_CODE[0b1001] == pytest.approx(2 * math.sqrt(3) / 8)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_surface_of_a_box(n):
    # an n^3 box: (n-1)^2 flat unit squares per face, n-1 bevels of sqrt(2)/2 per edge,
    # one corner triangle of sqrt(3)/8 per vertex
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[2:2 + n, 3:3 + n, 1:1 + n] = True
    points, areas = surface_elements(mask)
    expected = 6 * (n - 1) ** 2 + 12 * (n - 1) * math.sqrt(2) / 2 + 8 * math.sqrt(3) / 8
    assert areas.sum() == pytest.approx(expected)
    assert len(points) == (n + 1) ** 3 - max(n - 1, 0) ** 3
    assert points.min(axis=0).tolist() == [1.5, 2.5, 0.5]  # corners between voxels


def test_robust_hausdorff_of_a_shifted_box():
    # a 4^3 box and the same box shifted by 2 along W: the corner points of the two surfaces
    # lie on the same grid; most of either surface is 2 from the other's nearest point,
    # so the area-weighted 95th percentile is 2, the same in both directions
    a = np.zeros((12, 12, 12), dtype=bool)
    a[4:8, 4:8, 3:7] = True
    b = np.roll(a, 2, axis=2)
    assert robust_hausdorff_vox(a, a) == 0.0
    assert robust_hausdorff_vox(a, b) == pytest.approx(2.0)
    assert robust_hausdorff_vox(a, np.zeros_like(a)) == math.inf
