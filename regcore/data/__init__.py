"""The data layer: OASIS subjects (Neurite layout or the study's .npy lists), the embedded
synthetic cohort, the saved split, registration pairs and the pre-flight check.

Public API (docs/ARCHITECTURE.md): `load_cohort`, `Cohort`, `Volume`, `PairDataset`,
`ensure_embedded`, `check_data`; command `python -m regcore.data {build,check}`.
"""

from regcore.data.dataset import (SPLITS, Cohort, PairDataset, check_data, dataset_identity,
                                  load_cohort)
from regcore.data.embedded import EmbeddedParams, build_embedded, ensure_embedded
from regcore.data.volume import Volume, one_hot, resample_volume

__all__ = ["load_cohort", "Cohort", "PairDataset", "check_data", "dataset_identity",
           "ensure_embedded", "build_embedded", "EmbeddedParams", "Volume", "resample_volume", "one_hot", "SPLITS"]
