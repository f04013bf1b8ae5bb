"""Surfaces of label masks as area-weighted elements on the voxel-corner grid (Learn2Reg's HD95).

Learn2Reg scores HD95 with surface elements rather than surface voxels: every corner point of
the voxel grid whose 2x2x2 neighbourhood of voxels is partly inside the mask carries a piece of
the boundary surface, weighted by that piece's area; distances between two surfaces are taken
between those corner points, and the percentile is the area-weighted one. Units are voxels.

The area of each of the 256 neighbourhood patterns is computed here, once, from the boundary
polygons of the pattern: vertices at the midpoints of the cube edges whose two corners differ,
joined across each cube face (on a face with two diagonal inside corners the inside corners are
cut off separately), each closed polygon's area taken as the fan of triangles from its
centroid. For planar polygons this is the polygon's area; docs/METRICS.md says where the
non-planar ones can differ from other triangulations.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["SURFACE_AREA_BY_CODE", "surface_elements", "robust_hausdorff_vox"]

# corner v of the unit cube sits at bits (v >> 2 & 1, v >> 1 & 1, v & 1) along (D, H, W)
_CORNERS = np.array([[(v >> 2) & 1, (v >> 1) & 1, v & 1] for v in range(8)], dtype=np.float64)


def _face_cycles() -> list[tuple[int, int, int, int]]:
    """The 6 faces of the cube, each as its 4 corners in cyclic order."""
    faces = []
    for axis, side in itertools.product(range(3), (0, 1)):
        others = [k for k in range(3) if k != axis]
        cycle = []
        for a, b in ((0, 0), (0, 1), (1, 1), (1, 0)):
            bits = [0, 0, 0]
            bits[axis], bits[others[0]], bits[others[1]] = side, a, b
            cycle.append(bits[0] << 2 | bits[1] << 1 | bits[2])
        faces.append(tuple(cycle))
    return faces


_FACES = _face_cycles()


def _pattern_area(code: int) -> float:
    inside = [(code >> v) & 1 for v in range(8)]
    # each face contributes segments between midpoints of its cut edges (edges as corner pairs)
    links: dict[frozenset, list[frozenset]] = {}
    for cycle in _FACES:
        edges = [frozenset((cycle[i], cycle[(i + 1) % 4])) for i in range(4)]
        cut = [i for i in range(4) if inside[cycle[i]] != inside[cycle[(i + 1) % 4]]]
        if len(cut) == 2:
            segments = [(edges[cut[0]], edges[cut[1]])]
        elif len(cut) == 4:  # diagonal pattern: cut off each inside corner on its own
            segments = [(edges[(i - 1) % 4], edges[i]) for i in range(4) if inside[cycle[i]]]
        else:
            segments = []
        for a, b in segments:
            links.setdefault(a, []).append(b)
            links.setdefault(b, []).append(a)
    area, seen = 0.0, set()
    for start in links:
        if start in seen:
            continue
        loop, previous, current = [], None, start
        while current not in seen:  # every cut edge has exactly two neighbours: a closed loop
            seen.add(current)
            loop.append(_CORNERS[list(current)].mean(axis=0))
            nxt = [n for n in links[current] if n != previous and n not in seen]
            previous, current = current, (nxt[0] if nxt else start)
        points = np.array(loop)
        centre = points.mean(axis=0)
        rolled = np.roll(points, -1, axis=0)
        area += 0.5 * np.linalg.norm(np.cross(points - centre, rolled - centre), axis=1).sum()
    return float(area)


#: Surface area (voxel units) carried by a corner point per 8-bit pattern of its 2x2x2 voxels.
SURFACE_AREA_BY_CODE: np.ndarray = np.array([_pattern_area(c) for c in range(256)])


def surface_elements(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corner points of the boundary of a bool `(D, H, W)` mask and their surface areas.

    Returns `(points, areas)`: `(N, 3)` positions in voxels (a corner between voxels i-1 and i
    is at i - 0.5) and `(N,)` areas in voxel units. An empty or full-free mask gives N = 0.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"expected mask of shape (D, H, W), got {mask.shape}")
    if not mask.any():
        return np.zeros((0, 3)), np.zeros(0)
    # crop to the mask's bounding box with a margin of one empty voxel: the only corners with
    # a boundary piece lie there
    lo = np.argwhere(mask).min(axis=0)
    hi = np.argwhere(mask).max(axis=0) + 1
    padded = np.pad(mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)
    n = np.array(padded.shape) - 1  # corner points per axis
    code = np.zeros(tuple(n), dtype=np.uint8)
    for v in range(8):
        a, b, c = (v >> 2) & 1, (v >> 1) & 1, v & 1
        code |= padded[a:a + n[0], b:b + n[1], c:c + n[2]].astype(np.uint8) << v
    border = (code != 0) & (code != 255)
    index = np.argwhere(border)
    points = index + lo - 0.5  # corner (i, j, k) of the padded crop lies at lo + (i, j, k) - 1/2
    return points.astype(np.float64), SURFACE_AREA_BY_CODE[code[border]]


def _percentile_distance(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = int(np.searchsorted(cumulative, percentile / 100.0))
    return float(distances[order][min(index, len(order) - 1)])


def robust_hausdorff_vox(mask_a: np.ndarray, mask_b: np.ndarray,
                         percentile: float = 95.0) -> float:
    """Area-weighted `percentile` symmetric surface distance of two bool masks, in voxels.

    For each direction, the distances from the surface elements of one mask to the nearest
    surface element of the other, sorted; the first distance at which the cumulative area
    reaches `percentile` % (searchsorted) is that direction's value; the larger of the two is
    returned. Infinite when either mask is empty (there is no surface to measure to).
    """
    points_a, areas_a = surface_elements(mask_a)
    points_b, areas_b = surface_elements(mask_b)
    if len(points_a) == 0 or len(points_b) == 0:
        return float("inf")
    d_ab = cKDTree(points_b).query(points_a, k=1)[0]
    d_ba = cKDTree(points_a).query(points_b, k=1)[0]
    return max(_percentile_distance(d_ab, areas_a, percentile),
               _percentile_distance(d_ba, areas_b, percentile))
