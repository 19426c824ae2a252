"""A site's DATASETS record (common.protocol) checked, and turned into MLflow dataset inputs.

What a site sends is data from outside: each context's JSON is parsed and checked field by field
(the reasons name the field), and only then becomes an MLflow Dataset entity that holds metadata
only (name, digest, source, and a profile with the number of samples, the label histogram and
the input shape):
MLflow shows it in the run's Datasets and never sees a sample.
"""

import json

from fl_lightning_mlflow.common.protocol import (
    DATASET_CONTEXTS,
    MAX_DATASET_DIGEST_LENGTH,
    MAX_DATASET_NAME_LENGTH,
    MAX_PARAM_VALUE_LENGTH,
)

CONTEXT_TAG = "mlflow.data.context"  # the input tag MLflow's UI shows as the dataset's context
SOURCE_TYPE = "local"  # the data stay on the site; the source names its folder there
MAX_CLASSES = 1000  # a label histogram longer than this is not a classification dataset's
MAX_INPUT_DIMS = 8
# The dtypes a model input example is made of (torch's names, which numpy shares).
INPUT_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


def problem_of(context, text) -> str | None:
    """Why this (context, JSON text) cannot be a dataset input, or None."""
    if context not in DATASET_CONTEXTS:
        return f"has context {str(context)[:40]!r}, not one of {', '.join(DATASET_CONTEXTS)}"
    try:
        info = json.loads(text)
    except (TypeError, ValueError) as e:
        return f"{context} is not JSON ({type(e).__name__})"
    if not isinstance(info, dict):
        return f"{context} is not a JSON object"
    name, digest, n, histogram = (info.get(k) for k in ("name", "digest", "num_samples", "label_histogram"))
    if not isinstance(name, str) or not 0 < len(name) <= MAX_DATASET_NAME_LENGTH:
        return f"{context}: name must be text of 1..{MAX_DATASET_NAME_LENGTH} characters"
    if not isinstance(digest, str) or not 0 < len(digest) <= MAX_DATASET_DIGEST_LENGTH:
        return f"{context}: digest must be text of 1..{MAX_DATASET_DIGEST_LENGTH} characters"
    if not _count(n):
        return f"{context}: num_samples must be an integer >= 0"
    if not isinstance(histogram, dict) or len(histogram) > MAX_CLASSES or not all(map(_count, histogram.values())):
        return f"{context}: label_histogram must map at most {MAX_CLASSES} labels to counts"
    if histogram and sum(histogram.values()) != n:  # empty: targets that are not class labels
        return f"{context}: label_histogram counts {sum(histogram.values())} samples, num_samples says {n}"
    if "input_shape" in info and input_spec_of(info) is None:
        return f"{context}: input_shape must be at most {MAX_INPUT_DIMS} sizes >= 1, with an input_dtype torch knows"
    if not isinstance(info.get("source", ""), str) or len(info.get("source", "")) > MAX_PARAM_VALUE_LENGTH:
        return f"{context}: source must be text of at most {MAX_PARAM_VALUE_LENGTH} characters"
    return None


def input_spec_of(info: dict) -> tuple | None:
    """(shape tuple, numpy dtype name) of one sample's features, from a training context's JSON
    object (site.dataset_info.input_spec), or None when absent or malformed."""
    shape, dtype = info.get("input_shape"), info.get("input_dtype")
    if not isinstance(shape, list) or len(shape) > MAX_INPUT_DIMS or not all(_count(d) and d > 0 for d in shape):
        return None
    if dtype not in INPUT_DTYPES:
        return None
    return tuple(shape), dtype


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def dataset_input(context: str, text: str):
    """The MLflow DatasetInput for one checked context (problem_of gave None)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    info = json.loads(text)
    profile = {"num_samples": info["num_samples"], "label_histogram": info["label_histogram"]}
    if input_spec_of(info):
        profile.update(input_shape=info["input_shape"], input_dtype=info["input_dtype"])
    dataset = Dataset(
        name=info["name"],
        digest=info["digest"],
        source_type=SOURCE_TYPE,
        source=json.dumps({"uri": info.get("source", "")}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)])
