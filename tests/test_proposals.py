"""Tests of mapdet.data.proposals: Selective Search, cleaning, proposal files and the cache."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import given, settings
from hypothesis import strategies as st

from mapdet.core.boxes import box_iou
from mapdet.data import proposals as P

# ---------------------------------------------------------------------------------------------
# A tiny stand-in for DetectionDataset (the contract of docs/architecture.md, duck-typed)
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeRecord:
    image_id: str
    width: int
    height: int
    boxes: np.ndarray
    difficult: np.ndarray = field(default=None)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.boxes), bool)


def rectangles_image(seed: int, width: int, height: int, n: int = 3):
    """Noisy dark image with ``n`` bright rectangles -> (image (H, W, 3) uint8, gt (n, 4))."""
    rng = np.random.default_rng(seed)
    image = rng.normal(50, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
    gt = []
    for k in range(n):
        bw, bh = rng.integers(width // 6, width // 3), rng.integers(height // 6, height // 3)
        x = int(rng.integers(0, width - bw))
        y = int(rng.integers(0, height - bh))
        colour = [(230, 230, 230), (230, 60, 60), (60, 200, 60)][k % 3]
        image[y : y + bh, x : x + bw] = colour
        gt.append([x, y, x + bw, y + bh])
    return image, np.array(gt, np.float32)


class FakeDataset:
    """``records`` + ``load_image(i)``; images are synthetic rectangles (picklable)."""

    def __init__(self, n: int, width: int = 64, height: int = 48, prefix: str = "img"):
        self.records = []
        for i in range(n):
            _, gt = rectangles_image(i, width, height)
            self.records.append(FakeRecord(f"{prefix}{i:04d}", width, height, gt))

    def __len__(self):
        return len(self.records)

    def load_image(self, i: int) -> np.ndarray:
        rec = self.records[i]
        image, _ = rectangles_image(i, rec.width, rec.height)
        image[0, 0, 0] = i % 256  # lets the fake compute function know the image
        return image


def fake_proposals(image: np.ndarray) -> np.ndarray:
    v = float(image[0, 0, 0])
    return np.array([[0, 0, v + 5, v + 5], [1, 2, 10, 12]], np.float32)


class Counter:
    """Stand-in for ``compute_image_proposals`` counting its calls; can fail at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, image, method, params):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return fake_proposals(image)


def expected_fake(ds: FakeDataset) -> dict[str, np.ndarray]:
    return {r.image_id: fake_proposals(ds.load_image(i)) for i, r in enumerate(ds.records)}


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


# ---------------------------------------------------------------------------------------------
# Selective search
# ---------------------------------------------------------------------------------------------


def test_selective_search_covers_bright_rectangles():
    image, gt = rectangles_image(7, 160, 120)
    boxes = P.selective_search(image)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 120).all()
    assert (boxes[:, 2] - boxes[:, 0] >= P.DEFAULT_MIN_SIZE).all()
    assert (boxes[:, 3] - boxes[:, 1] >= P.DEFAULT_MIN_SIZE).all()
    np.testing.assert_array_equal(boxes, np.round(boxes))  # OpenCV's integer rects
    assert (box_iou(gt, boxes).max(axis=1) >= 0.5).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_selective_search_resized_maps_back_and_is_deterministic():
    image, gt = rectangles_image(3, 100, 80)
    boxes = P.selective_search(image, resize_to=160, max_proposals=50, min_size=2)
    assert boxes.dtype == np.float32 and 0 < len(boxes) <= 50
    assert (boxes[:, 2] <= 100).all() and (boxes[:, 3] <= 80).all() and (boxes >= 0).all()
    assert (box_iou(gt, boxes).max(axis=1) >= 0.5).all()
    again = P.selective_search(image, resize_to=160, max_proposals=50, min_size=2)
    np.testing.assert_array_equal(boxes, again)


def test_selective_search_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        P.selective_search(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        P.selective_search(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="mode"):
        P.selective_search(np.zeros((10, 10, 3), np.uint8), mode="slow")


# ---------------------------------------------------------------------------------------------
# clean_proposals
# ---------------------------------------------------------------------------------------------


def test_clean_proposals_example():
    boxes = np.array(
        [
            [-5, -3, 20, 30],  # clipped to [0, 0, 20, 30]
            [5, 5, 6, 20],  # width 1 < 2: removed
            [0, 0, 20, 30],  # duplicate of the first after clipping: removed
            [90, 10, 120, 50],  # clipped to [90, 10, 100, 50]
            [150, 10, 160, 20],  # outside: width 0 after clipping
            [30, 40, 10, 50],  # inverted: removed
            [1.5, 2.5, 4.0, 5.0],  # exactly min_size wide: kept
        ],
        np.float64,
    )
    out = P.clean_proposals(boxes, 100, 50, 2.0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0, 0, 20, 30], [90, 10, 100, 50], [1.5, 2.5, 4.0, 5.0]])
    assert P.clean_proposals(np.zeros((0, 4)), 10, 10, 1).shape == (0, 4)
    assert P.clean_proposals([], 10, 10, 1).shape == (0, 4)


def test_clean_proposals_does_not_modify_input_and_rejects_nan():
    boxes = np.array([[-1, -1, 5, 5]], np.float32)
    P.clean_proposals(boxes, 4, 4, 0)
    np.testing.assert_array_equal(boxes, [[-1, -1, 5, 5]])
    with pytest.raises(ValueError, match="NaN"):
        P.clean_proposals(np.array([[0, 0, np.nan, 1]]), 4, 4, 0)
    with pytest.raises(ValueError, match="shape"):
        P.clean_proposals(np.zeros((3, 5)), 4, 4, 0)
    with pytest.raises(ValueError, match="min_size"):
        P.clean_proposals(boxes, 4, 4, -1)


coords = st.one_of(
    st.integers(-8, 40).map(float),  # small range: many duplicates and clipped values
    st.floats(-50, 80, allow_nan=False, allow_infinity=False, width=32),
    st.just(-0.0),
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(st.tuples(coords, coords, coords, coords), max_size=30),
    repeat=st.lists(st.integers(0, 29), max_size=10),
    width=st.sampled_from([1, 17, 32.5, 40]),
    height=st.sampled_from([1, 20, 33]),
    min_size=st.sampled_from([0.0, 1.0, 2.5, 8.0]),
)
def test_clean_proposals_matches_reference(rows, repeat, width, height, min_size):
    boxes = np.array(rows, np.float32).reshape(-1, 4)
    if len(boxes):  # append exact repeats of earlier rows
        boxes = np.concatenate([boxes, boxes[[r % len(boxes) for r in repeat]]])
    fast = P.clean_proposals(boxes, width, height, min_size)
    ref = P.clean_proposals_reference(boxes, width, height, min_size)
    assert fast.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(fast, ref)


# ---------------------------------------------------------------------------------------------
# Proposal files
# ---------------------------------------------------------------------------------------------


def cell(arrays) -> np.ndarray:
    """A MATLAB cell array (1, n) of the given objects, as scipy.io.savemat writes one."""
    out = np.empty((1, len(arrays)), dtype=object)
    for k, a in enumerate(arrays):
        out[0, k] = a
    return out


def write_ss_mat(path: Path, ids, boxes_xyxy_1based) -> None:
    """A file shaped like Fast R-CNN's selective_search_data/*.mat (y1 x1 y2 x2, 1-based)."""
    yxyx = [np.asarray(b, np.float64).reshape(-1, 4)[:, [1, 0, 3, 2]] for b in boxes_xyxy_1based]
    scipy.io.savemat(path, {"boxes": cell(yxyx), "images": cell(list(ids))})


def test_mat_round_trip(tmp_path):
    path = tmp_path / "voc_2007_trainval.mat"
    ids = ["000005", "000007", "000009"]
    raw = [  # 1-based inclusive x1 y1 x2 y2
        [[1, 1, 10, 20], [5, 6, 7, 8]],
        np.zeros((0, 4)),
        [[3, 4, 500, 375]],
    ]
    write_ss_mat(path, ids, raw)
    got = P.load_proposal_file(path, ["000009", "000005", "000007"])
    assert list(got) == ["000009", "000005", "000007"]
    assert all(v.dtype == np.float32 for v in got.values())
    np.testing.assert_array_equal(got["000005"], [[0, 0, 10, 20], [4, 5, 7, 8]])
    assert got["000007"].shape == (0, 4)
    np.testing.assert_array_equal(got["000009"], [[2, 3, 500, 375]])
    # ids in the file but not asked for are ignored
    assert list(P.load_proposal_file(path, ["000007"])) == ["000007"]


def test_mat_errors_name_the_file(tmp_path):
    path = tmp_path / "ss.mat"
    write_ss_mat(path, ["a", "b"], [[[1, 1, 5, 5]], [[1, 1, 5, 5]]])
    with pytest.raises(P.ProposalFileError, match=r"ss\.mat.*2 of the data set's 3.*'c', 'd'"):
        P.load_proposal_file(path, ["a", "c", "d"])

    scipy.io.savemat(path, {"boxes": cell([np.ones((2, 4))])})
    with pytest.raises(P.ProposalFileError, match=r"ss\.mat: missing variable 'images'"):
        P.load_proposal_file(path, ["a"])

    scipy.io.savemat(path, {"boxes": cell([np.ones((2, 3))]), "images": cell(["a"])})
    with pytest.raises(P.ProposalFileError, match=r"ss\.mat: image 'a'.*shape \(P, 4\)"):
        P.load_proposal_file(path, ["a"])

    scipy.io.savemat(path, {"boxes": cell([np.full((1, 4), np.nan)]), "images": cell(["a"])})
    with pytest.raises(P.ProposalFileError, match=r"ss\.mat: image 'a'.*NaN"):
        P.load_proposal_file(path, ["a"])

    path.write_bytes(b"this is not a MATLAB file at all" * 10)
    with pytest.raises(P.ProposalFileError, match=r"ss\.mat"):
        P.load_proposal_file(path, ["a"])

    path.write_bytes(b"")
    with pytest.raises(P.ProposalFileError, match=r"ss\.mat: the file is empty"):
        P.load_proposal_file(path, ["a"])


def test_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "props.json"
    path.write_text(json.dumps({"x": [[1, 2, 3, 4.5]], "y": [], "z": [[0, 0, 1, 1]]}))
    got = P.load_proposal_file(path, ["y", "x"])
    assert list(got) == ["y", "x"]
    np.testing.assert_array_equal(got["x"], [[1, 2, 3, 4.5]])
    assert got["y"].shape == (0, 4) and got["y"].dtype == np.float32

    with pytest.raises(P.ProposalFileError, match=r"props\.json.*missing.*'w'"):
        P.load_proposal_file(path, ["x", "w"])
    path.write_text('{"x": [[1, 2, 3]]}')
    with pytest.raises(P.ProposalFileError, match=r"props\.json: image 'x'.*shape"):
        P.load_proposal_file(path, ["x"])
    path.write_text('{"x": [[1, 2, NaN, 4]]}')
    with pytest.raises(P.ProposalFileError, match=r"props\.json: image 'x'.*NaN"):
        P.load_proposal_file(path, ["x"])
    path.write_text('{"x": [[1, 2, 3, 4]')
    with pytest.raises(P.ProposalFileError, match=r"props\.json: cannot read as JSON"):
        P.load_proposal_file(path, ["x"])
    path.write_text("[[1, 2, 3, 4]]")
    with pytest.raises(P.ProposalFileError, match=r"props\.json: expected a JSON object"):
        P.load_proposal_file(path, ["x"])


def test_npz_round_trip_and_errors(tmp_path):
    path = tmp_path / "sub" / "props.npz"
    # "file" and "allow_pickle" would clash with np.savez's own arguments
    props = {"file": np.array([[1, 2, 3, 4]], np.float32), "allow_pickle": np.zeros((0, 4))}
    props["2008/000123"] = np.array([[0.5, 0.5, 9, 9], [1, 1, 2, 2]])
    P.save_proposals_npz(path, props, meta={"note": "test"})
    assert [p.name for p in path.parent.iterdir()] == ["props.npz"]  # no temp files left
    got = P.load_proposal_file(path, list(props))
    assert list(got) == list(props)
    for k in props:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], np.asarray(props[k]).reshape(-1, 4))

    with pytest.raises(P.ProposalFileError, match=r"props\.npz.*missing.*'nope'"):
        P.load_proposal_file(path, ["file", "nope"])
    with pytest.raises(ValueError, match="reserved"):
        P.save_proposals_npz(path, {"__meta__": np.zeros((0, 4))})
    with pytest.raises(ValueError, match="NaN"):
        P.save_proposals_npz(path, {"a": np.full((1, 4), np.nan)})

    plain = tmp_path / "plain.npz"
    np.savez(plain, a=np.zeros((1, 4)))
    with pytest.raises(P.ProposalFileError, match=r"plain\.npz: not a mapdet proposals"):
        P.load_proposal_file(plain, ["a"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(P.ProposalFileError, match=r"props\.npz: cannot read"):
        P.load_proposal_file(path, ["file"])


def test_unknown_or_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.mat"):
        P.load_proposal_file(tmp_path / "nothere.mat", ["a"])
    other = tmp_path / "props.pkl"
    other.write_bytes(b"x")
    with pytest.raises(P.ProposalFileError, match=r"props\.pkl: unknown proposal file type"):
        P.load_proposal_file(other, ["a"])


# ---------------------------------------------------------------------------------------------
# load_or_compute_proposals: file, cache, resume, corruption
# ---------------------------------------------------------------------------------------------


def test_from_file_cleans_boxes(tmp_path):
    ds = FakeDataset(2, width=64, height=48)
    path = tmp_path / "p.json"
    ids = [r.image_id for r in ds.records]
    boxes = [[-3, 0, 70, 40], [-3, 0, 70, 40], [1, 1, 2, 30], [0, 0, 10, 10]]
    path.write_text(json.dumps({ids[0]: boxes, ids[1]: []}))
    out = P.load_or_compute_proposals(ds, cache_dir=None, file=path, min_size=4)
    np.testing.assert_array_equal(out[ids[0]], [[0, 0, 64, 40], [0, 0, 10, 10]])
    assert out[ids[1]].shape == (0, 4)


def run_fake(ds, cache_dir, counter, monkeypatch, **kw):
    monkeypatch.setattr(P.workers, "compute_image_proposals", counter)
    kw.setdefault("num_workers", 0)
    kw.setdefault("chunk_size", 5)
    return P.load_or_compute_proposals(ds, cache_dir=cache_dir, progress=False, **kw)


def test_cache_second_call_loads_without_computing(tmp_path, monkeypatch, caplog):
    ds = FakeDataset(12)
    first = Counter()
    with caplog.at_level(logging.INFO, logger="mapdet.data.proposals"):
        out = run_fake(ds, tmp_path, first, monkeypatch)
    assert first.calls == 12
    assert_same(out, expected_fake(ds))
    files = cache_files(tmp_path)
    assert len(files) == 1 and files[0].startswith("selective_search-")  # parts dir removed
    assert "computing 12" in caplog.text

    caplog.clear()
    second = Counter()
    with caplog.at_level(logging.INFO, logger="mapdet.data.proposals"):
        again = run_fake(ds, tmp_path, second, monkeypatch)
    assert second.calls == 0
    assert_same(again, out)
    assert "from cache" in caplog.text

    # the consolidated cache file is a valid proposals file for file=...
    assert_same(P.load_proposal_file(tmp_path / files[0], [r.image_id for r in ds.records]), out)

    # other parameters or other images: another key, computed afresh
    third = Counter()
    run_fake(ds, tmp_path, third, monkeypatch, max_proposals=100)
    assert third.calls == 12
    fourth = Counter()
    run_fake(FakeDataset(3, prefix="other"), tmp_path, fourth, monkeypatch)
    assert fourth.calls == 3
    assert len(cache_files(tmp_path)) == 3


def test_no_cache_dir_computes_every_time(tmp_path, monkeypatch):
    ds = FakeDataset(4)
    counter = Counter()
    run_fake(ds, None, counter, monkeypatch)
    run_fake(ds, None, counter, monkeypatch)
    assert counter.calls == 8


def test_error_mid_way_resumes_from_chunks(tmp_path, monkeypatch):
    ds = FakeDataset(23)
    crashing = Counter(fail_at=13)  # images 0..11 done, image 12 fails
    with pytest.raises(RuntimeError, match=r"'img0012' \(index 12\).*simulated crash"):
        run_fake(ds, tmp_path, crashing, monkeypatch)
    (parts,) = tmp_path.glob("*.parts")
    # two full chunks, plus the partial chunk flushed on the way out
    assert sorted(p.name for p in parts.glob("chunk_*.npz")) == [
        "chunk_00000000.npz",
        "chunk_00000005.npz",
        "chunk_00000010.npz",
    ]
    resumed = Counter()
    out = run_fake(ds, tmp_path, resumed, monkeypatch)
    assert resumed.calls == 23 - 12
    assert_same(out, expected_fake(ds))
    assert not parts.exists()


def _killed_run(cache_dir: str) -> None:
    """Child process: computes, and dies hard (no cleanup at all) at the 13th image."""
    calls = [0]

    def compute(image, method, params):
        calls[0] += 1
        if calls[0] == 13:
            os._exit(3)
        return fake_proposals(image)

    P.workers.compute_image_proposals = compute
    P.load_or_compute_proposals(
        FakeDataset(23), cache_dir=cache_dir, num_workers=0, chunk_size=5, progress=False
    )


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_killed_process_resumes_from_chunks(tmp_path, monkeypatch):
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    (parts,) = tmp_path.glob("*.parts")
    assert len(list(parts.glob("chunk_*.npz"))) == 2  # images 0..9; 10, 11 were lost
    ds = FakeDataset(23)
    resumed = Counter()
    out = run_fake(ds, tmp_path, resumed, monkeypatch)
    assert resumed.calls == 23 - 10
    assert_same(out, expected_fake(ds))


def make_parts(tmp_path, monkeypatch, n=15, fail_at=12) -> Path:
    """A cache left by a failed run: chunks of 5 images, the last one partial."""
    with pytest.raises(RuntimeError):
        run_fake(FakeDataset(n), tmp_path, Counter(fail_at=fail_at), monkeypatch)
    (parts,) = tmp_path.glob("*.parts")
    return parts


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip_byte", "wrong_ids"])
def test_corrupt_chunk_is_recomputed_with_warning(tmp_path, monkeypatch, caplog, damage):
    parts = make_parts(tmp_path, monkeypatch)  # chunks 0..4, 5..9 and 10 (flushed)
    chunk = parts / "chunk_00000005.npz"
    data = chunk.read_bytes()
    if damage == "garbage":
        chunk.write_bytes(b"\x00" * 100)
    elif damage == "truncate":
        chunk.write_bytes(data[: len(data) - 50])
    elif damage == "flip_byte":  # inside the boxes array: the zip CRC catches it
        i = data.index(b"\x00\x00\x80\x3f")  # a float32 1.0 of the boxes
        chunk.write_bytes(data[:i] + b"\x01" + data[i + 1 :])
    else:  # a well-formed chunk whose image ids are not this data set's
        P.cache._write_chunk(parts, [5, 6], ["zz"] * 10, {"zz": np.zeros((1, 4), np.float32)})
    ds = FakeDataset(15)
    resumed = Counter()
    with caplog.at_level(logging.WARNING, logger="mapdet.data.proposals"):
        out = run_fake(ds, tmp_path, resumed, monkeypatch)
    assert "chunk_00000005.npz" in caplog.text and "recomputed" in caplog.text
    assert resumed.calls == 5 + 4  # the damaged chunk's images 5..9, and 11..14
    assert_same(out, expected_fake(ds))


def test_corrupt_consolidated_cache_is_recomputed(tmp_path, monkeypatch, caplog):
    ds = FakeDataset(6)
    run_fake(ds, tmp_path, Counter(), monkeypatch)
    (final,) = tmp_path.glob("*.npz")
    final.write_bytes(final.read_bytes()[:200])
    counter = Counter()
    with caplog.at_level(logging.WARNING, logger="mapdet.data.proposals"):
        out = run_fake(ds, tmp_path, counter, monkeypatch)
    assert counter.calls == 6 and "corrupt proposal cache" in caplog.text
    assert_same(out, expected_fake(ds))


def test_worker_pool_matches_in_process(tmp_path):
    """Real Selective Search in 2 spawned workers == in this process (deterministic)."""
    ds = FakeDataset(6, width=64, height=48)
    kw = dict(max_proposals=30, min_size=2, resize_to=128, progress=False)
    pooled = P.load_or_compute_proposals(ds, cache_dir=tmp_path, num_workers=2, chunk_size=4, **kw)
    local = P.load_or_compute_proposals(ds, cache_dir=None, num_workers=0, **kw)
    assert_same(pooled, local)
    assert P.proposal_recall(pooled, ds) >= 0.9  # (a few rectangles overlap each other)


def test_worker_error_names_the_image(monkeypatch):
    class Broken(FakeDataset):
        def load_image(self, i):
            if i == 2:
                raise OSError("cannot read image file /x/img0002.jpg")
            return super().load_image(i)

    with pytest.raises(OSError, match=r"'img0002'.*cannot read image file"):
        run_fake(Broken(4), None, Counter(), monkeypatch)


def test_duplicate_ids_and_bad_arguments(tmp_path):
    ds = FakeDataset(2)
    ds.records[1].image_id = ds.records[0].image_id
    with pytest.raises(ValueError, match="duplicate image id"):
        P.load_or_compute_proposals(ds, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown proposal method"):
        P.load_or_compute_proposals(FakeDataset(1), method="edge_boxes", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_proposal_stats():
    records = [
        FakeRecord("a", 100, 100, [[0, 0, 10, 10], [50, 50, 90, 90]], np.array([False, False])),
        FakeRecord("b", 100, 100, [[0, 0, 20, 20], [5, 5, 6, 6]], np.array([False, True])),
        FakeRecord("c", 100, 100, np.zeros((0, 4))),
    ]
    ds = type("DS", (), {"records": records})()
    props = {
        "a": np.array([[0, 0, 10, 12], [0, 0, 100, 100]], np.float32),  # covers gt 0 only
        "b": np.zeros((0, 4), np.float32),
        "c": np.array([[1, 1, 5, 5]], np.float32),
    }
    stats = P.proposal_stats(props, ds)
    assert (stats.num_gt, stats.num_covered) == (3, 1)
    assert stats.recall == pytest.approx(1 / 3)
    assert stats.mean_proposals == pytest.approx(1.0)
    assert P.proposal_recall(props, ds, iou=0.9) == 0.0
    with pytest.raises(KeyError, match="'c'"):
        P.proposal_stats({"a": props["a"], "b": props["b"]}, ds)


def test_stale_tmp_files_of_a_killed_run_are_removed(tmp_path, monkeypatch):
    parts = make_parts(tmp_path, monkeypatch)
    stale = [parts / ".chunk_00000015.npz.x1y2.tmp",
             tmp_path / f".{parts.name[:-len('.parts')]}.npz.a9b8.tmp"]
    for p in stale:
        p.write_bytes(b"half written")
    run_fake(FakeDataset(15), tmp_path, Counter(), monkeypatch)
    assert not any(p.exists() for p in stale)
    assert not list(tmp_path.rglob("*.tmp"))
