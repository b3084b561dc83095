"""What a well-formed model update is: the one check the server applies to every individual
update it aggregates, and a client applies to its own before masking it for SecAgg+.

An update is malformed when it has the wrong number of arrays, an array of the wrong shape or of a
non-floating dtype, a NaN or infinite value, or, when user-level DP clips updates, an L2 norm
above the clip bound (beyond float32 rounding). Under SecAgg+ the server cannot see individual
updates, so the client refuses to mask a malformed one of its own: it drops out of the round,
and SecAgg+'s dropout rules decide whether the round completes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fedpriv.common import secagg
from fedpriv.common.config import RunConfig

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NORM_TOLERANCE = 1e-5  # relative: an update clipped in float64 and sent as float32


def clip_bound(cfg: RunConfig) -> float | None:
    """The L2 bound every individual update must respect: user-level DP's clipping norm, unless
    updates are not clipped (user-level DP off) or are sent scaled and noised as integers
    (distributed noise)."""
    udp = cfg.user_dp
    return udp.clipping_norm if udp.enabled and not secagg.distributed(cfg) else None


def update_problem(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]],
                   clip: float | None = None) -> str | None:
    """Why ``arrays`` is not a well-formed update of a model with array ``shapes`` (clipped to
    L2 norm ``clip`` when given), or None when it is."""
    if len(arrays) != len(shapes):
        return f"{len(arrays)} arrays, the model has {len(shapes)}"
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        if tuple(np.shape(array)) != tuple(shape):
            return f"array {i} has shape {tuple(np.shape(array))}, the model's is {tuple(shape)}"
        if np.asarray(array).dtype not in FLOAT_DTYPES:
            return f"array {i} has dtype {np.asarray(array).dtype}, not float32 or float64"
    if not all(np.all(np.isfinite(a)) for a in arrays):
        return "non-finite values (NaN or infinity)"
    if clip is not None:
        norm = secagg.l2_norm(arrays)
        if norm > clip * (1 + NORM_TOLERANCE):
            return f"L2 norm {norm:.6g} above the clip bound {clip:g}"
    return None
