"""IJB numbers from per-face embeddings: face features, template features, 1:1 TAR at FAR, 1:N CMC and TPIR at FPIR.

Protocol (insightface's `eval_ijbc.py`): a face's feature is its embedding plus the embedding of its horizontal flip;
without "norm" it is L2-normalized, with "det_score" multiplied by the detector score. A template's feature is the
mean of its faces within each media, summed over its media, then L2-normalized. A pair's score is the cosine of its
two templates. TAR at a FAR target is read from sklearn's `roc_curve` at the FPR closest to the target (ties: the
higher TAR), so it can sit at a FPR some way off the target when there are few impostor pairs. A FAR below 1 / (the
number of impostor pairs) cannot be measured on the pairs at all (one false accept is already more): its point is
marked not resolved (`RocPoint.resolved`), and the report prints and stores no TAR for it.

1:N (NIST's open-set protocol, what `ijb_evals.py` in insightface's `_evaluation_/ijb` computes): every probe is
searched in each gallery separately. A probe whose subject has a template in the gallery is mated, else non-mated.
A gallery subject's score is its best template's cosine. CMC rank k: the share of mated probes whose subject ranks k
or better (ties count against the probe). TPIR at FPIR f: the threshold lets at most floor(f * non-mated) non-mated
probes' best scores strictly above it; TPIR is the share of mated probes ranked first with a score strictly above it.
(insightface's script allows one false alarm fewer, so it reads slightly lower TPIRs on small sets.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import auc, roc_curve

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (0.01, 0.1)
CMC_RANKS = (1, 5, 10)
# Pairs scored per step: bounds memory at two gathers of 65,536 x 512 float64 features (256 MiB each) for IJB-C's
# 15.7 million pairs.
_PAIR_CHUNK = 1 << 16


@dataclass(frozen=True)
class RocPoint:
    """The ROC read at one FAR target: the FAR actually read, the TAR there and the score threshold. `resolved` is
    False when the target lies below 1 / (impostor pairs): the curve's value there is not a measurement."""

    far_target: float
    far: float
    tar: float
    threshold: float
    resolved: bool = True


@dataclass(frozen=True)
class RocResult:
    """The 1:1 ROC of a protocol's pairs: the points read at `FAR_TARGETS`, the AUC, the whole curve, the counts.
    (The `.bin` protocol's accuracy is `evaluation.verification.VerificationResult`.)"""

    points: list[RocPoint]
    auc: float
    fpr: np.ndarray
    tpr: np.ndarray
    num_genuine: int
    num_impostor: int


@dataclass(frozen=True)
class TpirPoint:
    fpir_target: float
    fpir: float  # the share of non-mated probes that do raise an alarm at the threshold
    tpir: float
    threshold: float


@dataclass(frozen=True)
class IdentificationResult:
    """One gallery's 1:N numbers; NaN where the probe set has no mated (CMC, TPIR) or non-mated (FPIR) probes."""

    gallery: str
    num_gallery_templates: int
    num_gallery_subjects: int
    num_mated: int
    num_nonmated: int
    cmc: dict[int, float]
    tpir: list[TpirPoint]


def face_features(
    embeddings: np.ndarray, det_scores: np.ndarray, *, flip: bool = True, norm: bool = True, det_score: bool = True
) -> np.ndarray:
    """Per-face features `(N, D)` float64 from embeddings `(N, V, D)` (view 0: the image, view 1: its flip)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 3 or len(embeddings) != len(det_scores):
        raise ValueError(f"need (N, views, D) embeddings and N detector scores, got {embeddings.shape}")
    if flip and embeddings.shape[1] < 2:
        raise ValueError("flip test needs the flipped view (embeddings of shape (N, 2, D))")
    features = embeddings[:, 0] + embeddings[:, 1] if flip else embeddings[:, 0].copy()
    if not norm:
        features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    if det_score:
        features *= np.asarray(det_scores, dtype=np.float64)[:, None]
    return features


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(template ids ascending, L2-normalized template features)`: mean within a media, sum over media.

    A template whose features sum to zero stays zero (its scores are 0), as sklearn's `normalize` leaves it.
    """
    features = np.asarray(features, dtype=np.float64)
    # One fixed summation order (template, media, then file order) whatever the batch size or process count.
    order = np.lexsort((medias, templates))
    sorted_templates, sorted_medias = templates[order], medias[order]
    new_media = np.r_[True, (sorted_templates[1:] != sorted_templates[:-1]) | (sorted_medias[1:] != sorted_medias[:-1])]
    media_starts = np.flatnonzero(new_media)
    media_counts = np.diff(np.r_[media_starts, len(order)])
    media_means = np.add.reduceat(features[order], media_starts, axis=0) / media_counts[:, None]
    media_templates = sorted_templates[media_starts]
    template_starts = np.flatnonzero(np.r_[True, media_templates[1:] != media_templates[:-1]])
    summed = np.add.reduceat(media_means, template_starts, axis=0)
    norms = np.linalg.norm(summed, axis=1, keepdims=True)
    return media_templates[template_starts], summed / np.where(norms > 0, norms, 1.0)


def pair_scores(
    template_ids: np.ndarray, template_feats: np.ndarray, template1: np.ndarray, template2: np.ndarray
) -> np.ndarray:
    """Cosine score of each pair (templates looked up in the ascending `template_ids`), in chunks."""
    index1 = np.searchsorted(template_ids, template1)
    index2 = np.searchsorted(template_ids, template2)
    for index, wanted in ((index1, template1), (index2, template2)):
        found = (index < len(template_ids)) & (template_ids[np.minimum(index, len(template_ids) - 1)] == wanted)
        if not found.all():
            raise KeyError(f"template {wanted[~found][0]} has no feature")
    scores = np.empty(len(template1), dtype=np.float64)
    for start in range(0, len(template1), _PAIR_CHUNK):
        part = slice(start, start + _PAIR_CHUNK)
        scores[part] = np.einsum("ij,ij->i", template_feats[index1[part]], template_feats[index2[part]])
    return scores


def far_resolved(far_target: float, num_impostor: int) -> bool:
    """Whether `num_impostor` impostor pairs can measure a FAR of `far_target`: at least 1 / num_impostor."""
    # The epsilon: 1e-3 * 1000 is 1.0000000000000002 or 0.9999999999999999 depending on the operands' rounding.
    return far_target * num_impostor >= 1.0 - 1e-9


def verification_metrics(
    labels: np.ndarray, scores: np.ndarray, far_targets: tuple[float, ...] = FAR_TARGETS
) -> RocResult:
    """ROC of the pair scores and the TAR read at each FAR target (the FPR closest to it; ties: the higher TAR),
    each marked resolved or not (`far_resolved`)."""
    labels = np.asarray(labels)
    num_genuine = int((labels == 1).sum())
    num_impostor = int(len(labels) - num_genuine)
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"need genuine and impostor pairs, got {num_genuine} and {num_impostor}")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    points = []
    for target in far_targets:
        gap = np.abs(fpr - target)
        # fpr and tpr never decrease along the curve: the last of the closest points has the highest TAR.
        index = int(np.flatnonzero(gap == gap.min())[-1])
        resolved = far_resolved(target, num_impostor)
        points.append(RocPoint(target, float(fpr[index]), float(tpr[index]), float(thresholds[index]), resolved))
    return RocResult(points, float(auc(fpr, tpr)), fpr, tpr, num_genuine, num_impostor)


def identification_metrics(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    gallery: str,
    ranks: tuple[int, ...] = CMC_RANKS,
    fpir_targets: tuple[float, ...] = FPIR_TARGETS,
) -> IdentificationResult:
    """Open-set 1:N search of L2-normalized probe templates in one gallery (see the module docstring)."""
    similarity = np.asarray(probe_feats, np.float64) @ np.asarray(gallery_feats, np.float64).T
    subjects, gallery_subject_index = np.unique(gallery_subjects, return_inverse=True)
    # A subject with several gallery templates scores its best one.
    order = np.argsort(gallery_subject_index, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(gallery_subject_index[order]) != 0])
    subject_scores = np.maximum.reduceat(similarity[:, order], starts, axis=1)

    mate = np.minimum(np.searchsorted(subjects, probe_subjects), len(subjects) - 1)
    mated = subjects[mate] == probe_subjects
    mate_scores = subject_scores[mated, mate[mated]]
    # Rank of the mate: 1 + the other subjects scoring at least as high (a tie counts against the probe).
    mate_ranks = (subject_scores[mated] >= mate_scores[:, None]).sum(axis=1)
    nonmated_best = np.sort(subject_scores[~mated].max(axis=1, initial=-np.inf))[::-1]
    num_mated, num_nonmated = int(mated.sum()), int((~mated).sum())

    def share(hits: np.ndarray, total: int) -> float:
        return float(hits.sum()) / total if total else math.nan

    cmc = {rank: share(mate_ranks <= rank, num_mated) for rank in ranks}
    points = []
    for target in fpir_targets:
        # The epsilon: 0.29 * 100 is 28.999999999999996 in floating point, and 29 false alarms are allowed.
        allowed = math.floor(target * num_nonmated + 1e-9)
        threshold = float(nonmated_best[allowed]) if allowed < num_nonmated else -math.inf
        fpir = share(nonmated_best > threshold, num_nonmated)
        tpir = share((mate_ranks == 1) & (mate_scores > threshold), num_mated)
        points.append(TpirPoint(target, fpir, tpir, threshold))
    return IdentificationResult(gallery, len(gallery_subjects), len(subjects), num_mated, num_nonmated, cmc, points)
