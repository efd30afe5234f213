"""Box coder: encode/decode round trip, known values, clamping, clipping, broadcasting."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.models.box_coder import BBOX_XFORM_CLIP, clip_boxes, decode, encode


def _box(x, y, w, h):
    return [x, y, x + w, y + h]


coord = st.floats(-500, 500, allow_nan=False, allow_infinity=False)
size = st.floats(1.0, 50.0, allow_nan=False, allow_infinity=False)  # ratios stay < 1000/16


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(coord, coord, size, size, coord, coord, size, size), min_size=1, max_size=8)
)
def test_round_trip(rows):
    gt = torch.tensor([_box(*r[:4]) for r in rows], dtype=torch.float64)
    proposals = torch.tensor([_box(*r[4:]) for r in rows], dtype=torch.float64)
    deltas = encode(gt, proposals)
    assert deltas.shape == (len(rows), 4)
    torch.testing.assert_close(decode(deltas, proposals), gt, rtol=1e-9, atol=1e-9)


def test_known_values_and_weights():
    proposal = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    gt = torch.tensor([[5.0, 0.0, 15.0, 40.0]])  # centre +5 in x, +10 in y; height x2
    expected = torch.tensor([[10 * 0.5, 10 * 0.5, 0.0, 5 * math.log(2.0)]])
    torch.testing.assert_close(encode(gt, proposal), expected)
    unit = encode(gt, proposal, weights=(1.0, 1.0, 1.0, 1.0))
    torch.testing.assert_close(unit, torch.tensor([[0.5, 0.5, 0.0, math.log(2.0)]]))
    assert torch.equal(encode(proposal, proposal), torch.zeros(1, 4))


def test_decode_clamps_log_scale():
    proposal = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = torch.tensor([[0.0, 0.0, 1e4, 1e4]])
    box = decode(huge, proposal)
    side = 16.0 * math.exp(BBOX_XFORM_CLIP)  # 1000
    torch.testing.assert_close(
        box, torch.tensor([[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]])
    )
    assert torch.isfinite(box).all()


def test_decode_class_specific_broadcast_and_clip():
    rois = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 8.0, 8.0]])
    deltas = torch.zeros(2, 3, 4)
    deltas[0, 2] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # shift class 2 right by one width
    out = decode(deltas, rois)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[:, 0], rois)
    torch.testing.assert_close(out[0, 2], torch.tensor([30.0, 10.0, 50.0, 50.0]))
    clipped = decode(deltas, rois, clip_to=(45, 40))
    torch.testing.assert_close(clipped[0, 2], torch.tensor([30.0, 10.0, 40.0, 45.0]))


def test_clip_boxes():
    boxes = torch.tensor([[-3.0, -1.0, 120.0, 50.0], [5.0, 6.0, 7.0, 8.0]])
    out = clip_boxes(boxes, (40, 100))
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 100.0, 40.0], [5.0, 6.0, 7.0, 8.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_follow_inputs(dtype):
    p = torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=dtype)
    assert encode(p.float(), p).dtype == dtype
    assert decode(torch.zeros(1, 4, dtype=dtype), p.double()).dtype == dtype
