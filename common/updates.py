"""What a well-formed model update is: the one check the server applies to every individual
update it aggregates, and a client applies to its own before masking it for SecAgg+.

An update is malformed when it has the wrong number of arrays, an array of the wrong shape or of a
non-floating dtype, a NaN or infinite value, or, when user-level DP clips updates, an L2 norm
above the clip bound (beyond float32 rounding), or with adaptive clipping a clipped-or-not value
that is not one number of +-0.5 (one finite integer with distributed noise). Under SecAgg+ the server cannot see individual
updates, so the client refuses to mask a malformed one of its own: it drops out of the round,
and SecAgg+'s dropout rules decide whether the round completes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from fedpriv.common import secagg, user_dp
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import FedprivError
from fedpriv.common.protocol import USER_CLIP

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
NORM_TOLERANCE = 1e-5  # relative: an update clipped in float64 and sent as float32


def clip_bound(cfg: RunConfig, clip: float | None = None) -> float | None:
    """The L2 bound every individual update must respect: user-level DP's clipping norm (``clip``:
    the round's, with adaptive clipping), unless updates are not clipped (user-level DP off) or
    are sent scaled and noised as integers (distributed noise)."""
    udp = cfg.user_dp
    if not udp.enabled or secagg.distributed(cfg):
        return None
    return udp.clipping_norm if clip is None else clip


def round_clip(cfg: RunConfig, config: Any) -> float | None:
    """The round's user-level clip the server sent in its request ``config`` (adaptive clipping;
    None otherwise). Raises FedprivError when the request carries none that is usable."""
    if not (cfg.user_dp.enabled and cfg.user_dp.adaptive_clipping):
        return None
    value = config.get(USER_CLIP)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise FedprivError(f"the server sent no usable adaptive clipping norm ({USER_CLIP} = {value!r})")
    return float(value)


def individual_problem(cfg: RunConfig, arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]],
                       clip: float | None = None) -> str | None:
    """Why one client's update, as the client sends it, is malformed (None when it is not):
    :func:`update_problem` against the round's bound (:func:`clip_bound`; ``clip``: the round's
    adaptive clip) and, with adaptive clipping, its last array, the clipped-or-not value
    (:func:`common.user_dp.count_problem`). The client checks its own before masking it, the
    server each one it receives without SecAgg+."""
    if cfg.user_dp.enabled and cfg.user_dp.adaptive_clipping:
        arrays, count = user_dp.split_count(cfg, arrays)
        problem = user_dp.count_problem(cfg, count)
        if problem:
            return problem
    return update_problem(arrays, shapes, clip_bound(cfg, clip))


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
