"""Sample-quality metrics (docs/method.md section 7): one detector interface, two detectors.

- Inception (clean-fid legacy_tensorflow, local weights) → FID, IS, precision/recall.
- Data-set feature net → FD_<dataset>, IS-like score, precision/recall, class accuracy.

Images are uint8 [N, H, W, 3] everywhere; evaluation streams over batches.
"""

from .detectors import (
    INCEPTION_FILENAME,
    INCEPTION_PARAMS_KEY,
    INCEPTION_URL,
    Detector,
    FeatureNetDetector,
    InceptionDetector,
    legacy_tf_resize,
)
from .evaluate import Reservoir, compute_reference, evaluate_images, load_reference, save_reference
from .feature_net import FeatureNet, load_feature_net, predict, save_feature_net, train_feature_net
from .inception_score import InceptionScoreAccumulator, inception_score
from .prdc import knn_radii, precision_recall
from .stats import StreamingMoments, frechet_distance

__all__ = [
    "Detector",
    "InceptionDetector",
    "FeatureNetDetector",
    "INCEPTION_URL",
    "INCEPTION_FILENAME",
    "INCEPTION_PARAMS_KEY",
    "legacy_tf_resize",
    "FeatureNet",
    "train_feature_net",
    "save_feature_net",
    "load_feature_net",
    "predict",
    "StreamingMoments",
    "frechet_distance",
    "precision_recall",
    "knn_radii",
    "inception_score",
    "InceptionScoreAccumulator",
    "Reservoir",
    "compute_reference",
    "evaluate_images",
    "save_reference",
    "load_reference",
]
