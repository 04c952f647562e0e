"""The dataset split every part of a search sees, the same in the driver and in every trial (seeded; paths only)."""

from __future__ import annotations

from dataclasses import dataclass

from distributed_anomaly.data.dataset import load_dataset
from distributed_anomaly.data.mvtec import Record, records_of_split, split_train_val
from distributed_anomaly.errors import UserError
from distributed_anomaly.tuning.objective import ObjectiveData, split_test
from distributed_anomaly.tuning.request import TuneRequest


@dataclass(frozen=True)
class SearchData:
    """Training, validation and the two parts of the test split (search part, held-out part)."""

    fit: list[Record]
    val: list[Record]  # held-out normal training images: thresholds, early stopping, synthetic defects
    test: list[Record]
    search_part: list[Record]  # of the test split: val_auroc
    heldout: list[Record]  # of the test split: the best trial's final metrics, nothing else

    def objective_data(self, request: TuneRequest) -> ObjectiveData:
        return ObjectiveData(tuple(self.search_part), tuple(self.val), request.synthetic_copies, request.seed)


def prepare_data(request: TuneRequest) -> SearchData:
    records = load_dataset(request.data, request.data_layout, require_test=False)
    fit, val = split_train_val(records, request.val_fraction, request.seed)
    test = records_of_split(records, "test")
    search_part, heldout = split_test(test, request.search_fraction, request.seed)
    if request.objective == "val_auroc":
        labels = {r.label for r in search_part}
        if labels != {0, 1}:
            raise UserError(
                f"val_auroc needs normal and anomalous images in the search part of the test split "
                f"(got {len(search_part)} images, labels {sorted(labels)}): add test images or use "
                "--objective synthetic_auroc"
            )
    return SearchData(fit, val, test, search_part, heldout)
