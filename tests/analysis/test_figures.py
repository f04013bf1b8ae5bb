"""Figures: the example panel's geometry and input checks."""

import numpy as np
import pytest
from PIL import Image

from analysis.figures import _grid, example_slices
from tests.analysis.conftest import example_arrays


def test_example_figure_is_written(tmp_path):
    path = example_slices(example_arrays(), tmp_path / "example.png", "title")
    with Image.open(path) as image:
        assert image.size[0] > 800 and image.size[1] > 600


def test_grid_moves_with_a_translation_along_the_horizontal_axis():
    import matplotlib.pyplot as plt

    # u = 3 voxels along axis 0; in the axial slice (axis 2 fixed) axis 0 is horizontal, so
    # every grid line shifts right by exactly 3 and not at all vertically.
    ddf = np.zeros((3, 16, 16, 16))
    ddf[0] = 3.0
    fig, ax = plt.subplots()
    _grid(ax, ddf, axis=2, step=4)
    lines = ax.get_lines()
    first_vertical = lines[len(range(0, 16, 4))]  # after the horizontal lines
    assert np.allclose(first_vertical.get_xdata(), 3.0)
    assert np.allclose(first_vertical.get_ydata(), np.arange(16))
    plt.close(fig)


def test_example_with_mismatched_shapes_is_rejected(tmp_path):
    arrays = example_arrays()
    arrays["jacdet"] = arrays["jacdet"][:8]
    with pytest.raises(ValueError, match="example.npz: expected ddf_vox"):
        example_slices(arrays, tmp_path / "x.png")
