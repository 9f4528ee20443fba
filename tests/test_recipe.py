"""The default-model recipe's targets: what a frame shows, from the world's geometry."""
import pytest
import torch

from llamavid_ref.data.world import Sprite
from llamavid_ref.recipe import N_OBJECTS, frame_truth, object_class


def test_frame_truth_from_geometry():
    square = Sprite("square", "green", x=32, y=32)                 # covers x, y in 27..37
    circle = Sprite("circle", "red", x=12, y=52, motion="right", t_on=2.5)
    early, late = (frame_truth([square, circle], t, image=64, patch=8) for t in (0.0, 3.0))

    # the square covers at least a quarter of the 4 patches around the frame centre (8 px patches)
    assert early.labels.nonzero().flatten().tolist() == [27, 28, 35, 36]
    assert set(early.labels.tolist()) == {0, object_class(square)}
    assert early.centres[27].tolist() == [0.5, 0.5] and early.centres[0].tolist() == [0.0, 0.0]
    assert early.count == 1 and early.visible.nonzero().flatten().tolist() == [object_class(square) - 1]

    # at t = 3 s the circle is in view, centred at (12 + 3 * 3, 52) = (21, 52)
    assert late.count == 2 and late.visible.sum() == 2 and late.visible.shape == (N_OBJECTS,)
    on_circle = late.labels == object_class(circle)
    assert on_circle.any()
    assert late.centres[on_circle] == pytest.approx(torch.tensor([[21 / 64, 52 / 64]]).expand(int(on_circle.sum()), 2))
