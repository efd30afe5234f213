"""Object proposals: Selective Search, proposal files, and a resumable on-disk cache.

Every proposal array here is ``(P, 4)`` float32 ``xyxy`` in continuous pixel coordinates:
pixel ``k`` covers ``[k, k+1)``, so an OpenCV rectangle ``(x, y, w, h)`` is the box
``[x, y, x + w, y + h]`` and a box lies inside a ``W x H`` image when
``0 <= x1 <= x2 <= W`` and ``0 <= y1 <= y2 <= H``.

The pieces, from small to large:

- :func:`selective_search`: proposals for one ``(H, W, 3)`` uint8 RGB image with OpenCV's
  Selective Search (``cv2.ximgproc``), optionally on a rescaled copy.
- :func:`clean_proposals`: clip to the image, drop boxes thinner than ``min_size``, drop exact
  duplicates (first occurrence kept, order kept); :func:`clean_proposals_reference` is the
  slow obvious version the tests compare it with.
- :func:`load_proposal_file` / :func:`save_proposals_npz`: precomputed proposals in the
  original Fast R-CNN MATLAB files, in our ``.npz`` format, or in JSON.
- :func:`load_or_compute_proposals`: proposals for a whole data set, computed once by worker
  processes and cached on disk in atomically written chunks, so that an interrupted run
  resumes where it stopped.
- :func:`proposal_stats` / :func:`proposal_recall`: recall of the ground truth, for
  diagnostics.

File formats (what :func:`load_proposal_file` reads, chosen by the file's suffix):

- ``.mat``: R-CNN / Fast R-CNN ``selective_search_data/<split>.mat``: a cell array ``boxes``
  with one ``(P, 4)`` array per image stored ``y1, x1, y2, x2`` in 1-based inclusive pixels,
  and a cell array ``images`` of image ids. ``[y1, x1, y2, x2]`` becomes
  ``[x1 - 1, y1 - 1, x2, y2]``.
- ``.npz`` (ours, written by :func:`save_proposals_npz`): one ``(P, 4)`` float32 array per
  image id, named by the id, plus ``__format_version__`` (an int) and optionally ``__meta__``
  (a JSON string).
- ``.json``: ``{"<image_id>": [[x1, y1, x2, y2], ...], ...}`` in our xyxy convention.

Modules, one job each: :mod:`.cleaning`, :mod:`.selective_search`, :mod:`.formats`,
:mod:`.cache` (key, chunks, consolidated file), :mod:`.workers` (in-process or a pool),
:mod:`.load` (:func:`load_or_compute_proposals`, which ties them together) and
:mod:`.stats` (recall).
"""

from mapdet.data.proposals.cache import DEFAULT_CHUNK_SIZE, proposal_cache_key
from mapdet.data.proposals.cleaning import (
    DEFAULT_MIN_SIZE,
    clean_proposals,
    clean_proposals_reference,
)
from mapdet.data.proposals.formats import (
    FORMAT_VERSION,
    ProposalFileError,
    load_proposal_file,
    save_proposals_npz,
)
from mapdet.data.proposals.load import load_or_compute_proposals
from mapdet.data.proposals.selective_search import (
    METHODS,
    compute_image_proposals,
    selective_search,
)
from mapdet.data.proposals.stats import ProposalStats, proposal_recall, proposal_stats

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MIN_SIZE",
    "FORMAT_VERSION",
    "METHODS",
    "ProposalFileError",
    "ProposalStats",
    "clean_proposals",
    "clean_proposals_reference",
    "compute_image_proposals",
    "load_or_compute_proposals",
    "load_proposal_file",
    "proposal_cache_key",
    "proposal_recall",
    "proposal_stats",
    "save_proposals_npz",
    "selective_search",
]
