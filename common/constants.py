"""Named constants that several floors need (configs, models, engine), defined once."""

#: CVNet-Global's multi-scale test: the uint8 image resized with OpenCV to 1/sqrt(2), 1 and sqrt(2) of its size.
CVNET_TEST_SCALES: tuple[float, ...] = (0.7071, 1.0, 1.4142)
#: SuperGlobal's Scale-GeM scales, resized inside the model (the release's values, the same three factors).
SUPERGLOBAL_SCALES: tuple[float, ...] = (0.7071, 1.0, 1.4142)
#: CVNet's final similarity for re-ranked candidates: ``global cosine + CVNET_SCORE_WEIGHT * CVNet score``.
CVNET_SCORE_WEIGHT: float = 0.5
#: Global candidates CVNet re-ranks (the paper's top 100).
CVNET_RERANK_TOP_K: int = 100
