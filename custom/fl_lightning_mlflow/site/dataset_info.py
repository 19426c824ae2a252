"""What a site says about its data in MLflow: name, digest, size, label histogram and input shape,
never samples.

For a DataModule whose sets are TensorDatasets (features first, targets last), the digest is a
hash of the tensors as the site trains on them, so two sites, or two runs, with the same data
have the same digest and any change to the data or the split changes it; integer targets get a
label histogram (a regression's float targets get none). For any other Dataset the description
holds its length and a digest of the length and class only (reading every sample to describe it
would cost a pass over the data). The training set's first sample gives the model's input shape
and dtype, which the server uses for the logged models' input example and signature.
Pure functions: no FLARE, no MLflow.
"""

import collections
import hashlib
import json

import numpy as np

from fl_lightning_mlflow.common.protocol import DATASET_CONTEXTS, MAX_DATASET_DIGEST_LENGTH

DIGEST_LENGTH = 16  # hex characters: MLflow's digests are short too (its column holds 36)
assert DIGEST_LENGTH <= MAX_DATASET_DIGEST_LENGTH
MAX_HISTOGRAM_LABELS = 1000  # more distinct integer targets than this: not a classification's labels


def digest_of(*arrays) -> str:
    """A short hex digest of the arrays' shapes, types and bytes, in order."""
    h = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()[:DIGEST_LENGTH]


def label_histogram(labels) -> dict:
    """{label as text: count}, labels in order (JSON keys are text); {} for targets that are not
    class labels (floats, several per sample, too many distinct values)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return {}
    counts = collections.Counter(int(v) for v in labels)
    if len(counts) > MAX_HISTOGRAM_LABELS:
        return {}
    return {str(k): counts[k] for k in sorted(counts)}


def describe(name: str, images, labels, source: str) -> dict:
    """One dataset of feature and target arrays, as the site sends it (common.protocol.DATASET_FIELDS)."""
    labels = np.asarray(labels)
    return {
        "name": name,
        "digest": digest_of(labels, images),
        "num_samples": int(labels.shape[0]),
        "label_histogram": label_histogram(labels),
        "source": source,
    }


def describe_dataset(name: str, dataset, source: str) -> dict:
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and tensors:
        arrays = [t.detach().cpu().numpy() for t in tensors]
        return describe(name, arrays[0], arrays[-1], source)
    n = len(dataset)
    kind = f"{type(dataset).__module__}.{type(dataset).__qualname__}"
    return {"name": name, "digest": digest_of(np.array([n]), np.frombuffer(kind.encode(), np.uint8)),
            "num_samples": int(n), "label_histogram": {}, "source": source}  # fmt: skip


def input_spec(dataset) -> dict:
    """{"input_shape": [...], "input_dtype": "float32"} of one sample's features, or {}."""
    try:
        sample = dataset[0]
    except Exception:  # noqa: BLE001 - describing is a courtesy: an odd dataset just goes without
        return {}
    x = sample[0] if isinstance(sample, (tuple, list)) else sample
    shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return {}
    return {"input_shape": [int(d) for d in shape], "input_dtype": str(dtype).removeprefix("torch.")}


def site_datasets(site: str, data_module) -> dict:
    """{context: JSON text} for a DataModule's training and validation sets (its loaders' datasets),
    the value of the DATASETS record the executor sends; the training one carries the input spec."""
    source = str(getattr(data_module, "data_root", "") or type(data_module).__name__)
    out = {}
    loaders = (data_module.train_dataloader(), data_module.val_dataloader())
    for context, loader in zip(DATASET_CONTEXTS, loaders, strict=True):
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            continue
        info = describe_dataset(f"{site}-{'train' if context == 'training' else 'val'}", dataset, source)
        if context == "training":
            info.update(input_spec(dataset))
        out[context] = json.dumps(info, sort_keys=True)
    return out
