"""What a site says about its data in MLflow: name, digest, size and label histogram, never samples.

The digest is a hash of the labels and the images as the site trains on them (the tensors after
normalization), so two sites, or two runs, with the same data have the same digest, and any
change to the data or the split changes it. Pure functions: no FLARE, no MLflow.
"""

import collections
import hashlib
import json

import numpy as np

from fl_lightning_mlflow.common.protocol import DATASET_CONTEXTS, MAX_DATASET_DIGEST_LENGTH

DIGEST_LENGTH = 16  # hex characters: MLflow's digests are short too (its column holds 36)
assert DIGEST_LENGTH <= MAX_DATASET_DIGEST_LENGTH


def digest_of(*arrays) -> str:
    """A short hex digest of the arrays' shapes, types and bytes, in order."""
    h = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()[:DIGEST_LENGTH]


def label_histogram(labels) -> dict:
    """{label as text: count}, labels in order (JSON keys are text)."""
    counts = collections.Counter(int(v) for v in np.asarray(labels).ravel())
    return {str(k): counts[k] for k in sorted(counts)}


def describe(name: str, images, labels, source: str) -> dict:
    """One dataset as the site sends it (common.protocol.DATASET_FIELDS)."""
    labels = np.asarray(labels)
    return {
        "name": name,
        "digest": digest_of(labels, images),
        "num_samples": int(labels.shape[0]),
        "label_histogram": label_histogram(labels),
        "source": source,
    }


def site_datasets(site: str, data_module, data_root: str) -> dict:
    """{context: JSON text} for a SiteDataModule's training and validation sets (TensorDatasets
    of images and labels), the value of the DATASETS record the executor sends."""
    out = {}
    for context, dataset in zip(DATASET_CONTEXTS, (data_module.train_set, data_module.val_set), strict=True):
        images, labels = (t.numpy() for t in dataset.tensors)
        info = describe(f"{site}-{'train' if context == 'training' else 'val'}", images, labels, str(data_root))
        out[context] = json.dumps(info, sort_keys=True)
    return out
