"""STRAP: sub-trajectory retrieval by subsequence DTW over per-step embeddings.

1. Cut each target demo into sub-trajectories where the end-effector stops: a cut follows every
   step t whose speed ``sum_k |p[t+1, k] - p[t, k]|`` (L1 over the position dims, MetaWorld's
   hand position is ``state[:3]``) is below ``threshold``; then segments shorter than
   ``min_length`` merge into the next one (the last into the previous one).
2. Match each query segment q (n steps) against every prior episode x (m steps) with subsequence
   DTW, steps (1, 1) and (1, 2) in (query, prior) index:
   ``D[0, j] = C[0, j]``, ``D[i, j] = C[i, j] + min(D[i-1, j-1], D[i-1, j-2])`` with
   ``C[i, j] = ||q_i - x_j||``; the match ends at ``b = argmin_j D[n-1, j]`` with cost
   ``D[n-1, b]`` and starts where its optimal path enters row 0. A match therefore spans
   between n and 2n - 1 prior steps, and an episode shorter than n has no match.
3. Per segment keep the ``max(1, k // n_segments)`` lowest-cost matches (k = 100 by default), or
   with ``k=None`` every match, ranked within its segment.
4. Step score, ``scoring="cost"``: ``1 / (1 + cost / n)`` (inverse of the mean per-step DTW
   distance) of the best kept match covering the step; ``scoring="rank"``: the match's rank within
   its segment (best first) mapped to (0, 1], ties between segments broken by cost, so that a
   selection that fills a step budget takes every segment's best match, then every segment's
   second, ...: the reference's "top k split evenly across the target's segments", with k set by
   the budget. Steps that no kept match covers score 0. Scores lie in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distcur.schema import describe_row

DEFAULT_THRESHOLD = 5e-3
DEFAULT_MIN_LENGTH = 20
DEFAULT_TOP_K = 100
SCORINGS = ("cost", "rank")
_CELLS_PER_BLOCK = 4_000_000  # bound on query-length x episodes x episode-length per DTW block


def segment_by_speed(positions: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                     min_length: int = DEFAULT_MIN_LENGTH) -> list[tuple[int, int]]:
    """Cut one demo at low end-effector speed; returns [start, end) row bounds covering all rows.

    Every segment has at least ``min_length`` rows, unless the whole demo is shorter (then it
    is one segment).
    """
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 2 or len(positions) == 0:
        raise ValueError(f"segment_by_speed: expected (T, k) positions with T >= 1, got {positions.shape}")
    if min_length < 1:
        raise ValueError(f"segment_by_speed: min_length must be >= 1, got {min_length}")
    speed = np.abs(np.diff(positions, axis=0)).sum(1)
    cuts = [int(t) + 1 for t in np.flatnonzero(speed < threshold)]
    bounds = [0, *cuts, len(positions)]
    raw = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
    merged: list[tuple[int, int]] = []
    cur = raw[0]
    for seg in raw[1:]:
        if cur[1] - cur[0] < min_length:
            cur = (cur[0], seg[1])
        else:
            merged.append(cur)
            cur = seg
    if cur[1] - cur[0] < min_length and merged:
        merged[-1] = (merged[-1][0], cur[1])
    else:
        merged.append(cur)
    return merged


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances, float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def subsequence_dtw_batch(query: np.ndarray, series: np.ndarray, lengths: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subsequence DTW of one query against E padded series at once.

    Args:
        query: (n, d); series: (E, L, d), series e valid on its first ``lengths[e]`` rows.
    Returns:
        cost (E,) float64 (inf where no match is possible), start (E,) and end (E,) int64
        row bounds of the match, inclusive (-1 where no match).
    """
    n = len(query)
    E, L, d = series.shape
    if n == 0:
        raise ValueError("subsequence DTW: empty query")
    if query.shape[1] != d:
        raise ValueError(f"subsequence DTW: query dim {query.shape[1]} != series dim {d}")
    C = _pairwise_distances(query, series.reshape(E * L, d)).reshape(n, E, L)
    C[:, np.arange(L)[None, :] >= np.asarray(lengths)[:, None]] = np.inf
    D = C[0].copy()
    S = np.broadcast_to(np.arange(L, dtype=np.int64), (E, L)).copy()
    inf = np.full((E, 1), np.inf)
    for i in range(1, n):
        one = np.concatenate([inf, D[:, :-1]], axis=1)  # D[i-1, j-1]
        two = np.concatenate([inf, inf, D[:, :-2]], axis=1)[:, :L]  # D[i-1, j-2]
        take_one = one <= two  # ties go to the diagonal step, as STRAP's backtracking does
        s_one = np.concatenate([np.zeros((E, 1), np.int64), S[:, :-1]], axis=1)
        s_two = np.concatenate([np.zeros((E, 2), np.int64), S[:, :-2]], axis=1)[:, :L]
        S = np.where(take_one, s_one, s_two)
        D = C[i] + np.where(take_one, one, two)
    end = D.argmin(1)
    cost = D[np.arange(E), end]
    start = S[np.arange(E), end]
    none = ~np.isfinite(cost)
    cost[none] = np.inf
    return cost, np.where(none, -1, start), np.where(none, -1, end)


def subsequence_dtw(query: np.ndarray, series: np.ndarray) -> tuple[float, int, int]:
    """Best match of ``query`` (n, d) inside ``series`` (m, d): (cost, start, end inclusive)."""
    series = np.asarray(series)
    cost, start, end = subsequence_dtw_batch(np.asarray(query), series[None], np.array([len(series)]))
    return float(cost[0]), int(start[0]), int(end[0])


@dataclass(frozen=True)
class Match:
    """A matched sub-trajectory: steps [start_step, end_step] of (source, episode) for query ``segment``."""

    segment: int
    source: str
    episode: int
    start_step: int
    end_step: int
    cost: float
    query_length: int

    @property
    def score(self) -> float:
        return 1.0 / (1.0 + self.cost / self.query_length)


def split_episodes(episode: np.ndarray, step: np.ndarray) -> list[np.ndarray]:
    """Row indices of each episode, ordered by step (rows of one episode need not be contiguous)."""
    order = np.lexsort((np.asarray(step), np.asarray(episode)))
    ep_sorted = np.asarray(episode)[order]
    bounds = np.flatnonzero(np.diff(ep_sorted)) + 1
    return [idx for idx in np.split(order, bounds) if len(idx)]


def match_episodes(segments: list[np.ndarray], source: str, episode: np.ndarray, step: np.ndarray,
                   z: np.ndarray) -> list[Match]:
    """Best match of every query segment in every episode of (episode, step, z) rows of one source.

    Args:
        segments: query sub-trajectories, each (n_q, d) embeddings.
        episode, step: (N,) keys of the prior rows; z: (N, d) their embeddings.
    """
    z = np.asarray(z)
    if len(z) == 0:
        return []
    if z.ndim != 2:
        raise ValueError(f"STRAP: prior embeddings of source {source!r} must be (N, d), got {z.shape}")
    for q, seg in enumerate(segments):
        if seg.ndim != 2 or seg.shape[1] != z.shape[1]:
            raise ValueError(f"STRAP: query segment {q} has shape {seg.shape} but prior embeddings of "
                             f"source {source!r} have dim {z.shape[1]}")
    if not np.isfinite(z).all():
        row = int(np.argmin(np.isfinite(z).all(1)))
        raise ValueError(f"STRAP: non-finite embedding at source={source!r}, episode={episode[row]}, step={step[row]}")
    episodes = split_episodes(episode, step)
    out: list[Match] = []
    lengths_all = np.array([len(idx) for idx in episodes])
    for q, seg in enumerate(segments):
        n = len(seg)
        per_block = max(1, _CELLS_PER_BLOCK // max(1, n * int(lengths_all.max())))
        for b0 in range(0, len(episodes), per_block):
            block = episodes[b0:b0 + per_block]
            lengths = lengths_all[b0:b0 + per_block]
            padded = np.zeros((len(block), int(lengths.max()), z.shape[1]), z.dtype)
            for e, idx in enumerate(block):
                padded[e, :len(idx)] = z[idx]
            cost, start, end = subsequence_dtw_batch(seg, padded, lengths)
            for e, idx in enumerate(block):
                if np.isfinite(cost[e]):
                    out.append(Match(q, source, int(episode[idx[0]]), int(step[idx[start[e]]]),
                                     int(step[idx[end[e]]]), float(cost[e]), n))
    return out


def top_k_matches(matches: list[Match], n_segments: int, k: int | None = DEFAULT_TOP_K) -> list[Match]:
    """Per segment, the ``max(1, k // n_segments)`` lowest-cost matches (all with ``k=None``), best
    first within each segment (ties by source, episode)."""
    if n_segments < 1:
        raise ValueError("STRAP: no query segments")
    per_segment = None if k is None else max(1, k // n_segments)
    kept: list[Match] = []
    for q in range(n_segments):
        mine = sorted((m for m in matches if m.segment == q), key=lambda m: (m.cost, m.source, m.episode))
        kept.extend(mine[:per_segment])
    return kept


def match_step_scores(kept: list[Match], scoring: str = "cost") -> list[float]:
    """The score each kept match gives the steps it covers (``kept`` as :func:`top_k_matches` orders it)."""
    if scoring not in SCORINGS:
        raise ValueError(f"STRAP: scoring must be one of {SCORINGS}, got {scoring!r}")
    if scoring == "cost":
        return [m.score for m in kept]
    rank: dict[int, int] = {}
    ranks = []
    for m in kept:
        ranks.append(rank.get(m.segment, 0))
        rank[m.segment] = ranks[-1] + 1
    depth = max(ranks, default=0) + 1
    # rank r -> (depth - r) / depth, plus a tie-break in (0, 1 / depth) from the match's cost score
    return [(depth - r - 1 + m.score) / depth for r, m in zip(ranks, kept)]


def step_scores_from_matches(source: str, episode: np.ndarray, step: np.ndarray, kept: list[Match],
                             match_scores: list[float] | None = None, padding: int = 0) -> np.ndarray:
    """(N,) score of each (source, episode[i], step[i]): the best kept match covering it, else 0.

    ``match_scores``: each kept match's score (default: :attr:`Match.score`); ``padding``: steps
    added on both sides of every match (STRAP's reference retrieves 5 frames of context)."""
    episode = np.asarray(episode)
    step = np.asarray(step)
    out = np.zeros(len(episode), np.float64)
    scores = match_scores if match_scores is not None else [m.score for m in kept]
    by_episode: dict[int, list[tuple[Match, float]]] = {}
    for m, v in zip(kept, scores):
        if m.source == source:
            by_episode.setdefault(m.episode, []).append((m, v))
    if not by_episode:
        return out
    for e in np.intersect1d(np.unique(episode), np.fromiter(by_episode, np.int64)).tolist():
        rows = np.flatnonzero(episode == e)
        for m, v in by_episode[e]:
            hit = rows[(step[rows] >= m.start_step - padding) & (step[rows] <= m.end_step + padding)]
            np.maximum.at(out, hit, v)
    return out


def target_segments(z: np.ndarray, positions: np.ndarray, episode: np.ndarray, step: np.ndarray,
                    threshold: float = DEFAULT_THRESHOLD, min_length: int = DEFAULT_MIN_LENGTH,
                    source: str = "target") -> list[np.ndarray]:
    """Query sub-trajectories (embedding arrays) of all target demos, demo by demo (``source``: theirs,
    named in errors)."""
    z = np.asarray(z)
    if len(z) == 0:
        raise ValueError("STRAP: the target set is empty; need at least one target demo")
    if not np.isfinite(z).all():
        row = int(np.argmin(np.isfinite(z).all(1)))
        raise ValueError(f"STRAP: non-finite target embedding at {describe_row(row, (source, episode, step))}")
    segments = []
    for idx in split_episodes(episode, step):
        for s, e in segment_by_speed(positions[idx], threshold, min_length):
            segments.append(z[idx[s:e]])
    return segments


def strap_scores(prior_z: np.ndarray, prior_episode: np.ndarray, prior_step: np.ndarray,
                 target_z: np.ndarray, target_positions: np.ndarray, target_episode: np.ndarray,
                 target_step: np.ndarray, k: int | None = DEFAULT_TOP_K, threshold: float = DEFAULT_THRESHOLD,
                 min_length: int = DEFAULT_MIN_LENGTH, source: str = "prior",
                 scoring: str = "cost", padding: int = 0) -> tuple[np.ndarray, list[Match]]:
    """STRAP in one process: (N,) prior step scores in [0, 1] and the kept matches.

    Args:
        prior_z: (N, d) per-step embeddings with keys prior_episode, prior_step (N,).
        target_z: (M, d) embeddings of the target demos; target_positions: (M, k) end-effector
        positions used for segmentation; target_episode, target_step: (M,) keys.
    """
    if np.asarray(prior_z).ndim == 2 and np.asarray(target_z).ndim == 2 and len(target_z) \
            and np.asarray(prior_z).shape[1] != np.asarray(target_z).shape[1]:
        raise ValueError(f"STRAP: prior embeddings have dim {np.asarray(prior_z).shape[1]} but target "
                         f"embeddings have dim {np.asarray(target_z).shape[1]}")
    segments = target_segments(target_z, target_positions, target_episode, target_step, threshold, min_length)
    matches = match_episodes(segments, source, prior_episode, prior_step, prior_z)
    kept = top_k_matches(matches, len(segments), k)
    scores = step_scores_from_matches(source, prior_episode, prior_step, kept, match_step_scores(kept, scoring), padding)
    return scores, kept
