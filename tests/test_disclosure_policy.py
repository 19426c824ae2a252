"""The site's disclosure policy file: where it is found, what it says, and one line per problem."""

import json

import pytest

from fl_lightning_mlflow.site.disclosure_policy import (
    PolicyError,
    policy_path,
    problems_of,
    read_policy,
    starting_policy,
)


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_the_sites_own_file_comes_before_the_shared_one_and_none_means_none(tmp_path):
    assert policy_path(tmp_path, "site-1") is None
    shared = write(tmp_path / "disclosure_policy.json", {})
    assert policy_path(tmp_path, "site-1") == shared
    own = write(tmp_path / "disclosure_policy.site-1.json", {})
    assert policy_path(tmp_path, "site-1") == own
    assert policy_path(tmp_path, "site-2") == shared  # another site's file is not this site's


def test_a_full_policy_reads_into_its_rules_and_its_digest_ignores_layout(tmp_path):
    data = {
        "name": "hospital-a",
        "metrics": {"allow": ["*loss*"], "deny": ["*_step"], "min_validation_samples": 50,
                    "coarsen": {"val_loss": 0.01}, "noise": {"train_loss": {"mechanism": "laplace", "scale": 0.1}}},
        "datasets": {"disclose": "counts"},
        "system_metrics": False,
    }  # fmt: skip
    policy = read_policy(write(tmp_path / "p.json", data))
    assert policy.name == "hospital-a" and len(policy.digest) == 16
    assert policy.metrics.allows("train_loss") and not policy.metrics.allows("train_loss_step")
    assert not policy.metrics.allows("val_acc")
    assert policy.params.allows("anything") and policy.tags.allows("anything")  # sections left out: as before
    assert (policy.disclose, policy.system_metrics, policy.min_validation_samples) == ("counts", False, 50)
    assert policy.transforms() == "train_loss: laplace noise, scale 0.1; val_loss: rounded to a multiple of 0.01"
    same = read_policy(write(tmp_path / "q.json", json.dumps(data, indent=4, sort_keys=True)))
    assert same.digest == policy.digest
    assert read_policy(write(tmp_path / "r.json", {**data, "system_metrics": True})).digest != policy.digest


def test_an_unnamed_policy_is_named_after_its_file_and_the_starting_policy_is_valid(tmp_path):
    assert read_policy(write(tmp_path / "disclosure_policy.json", {})).name == "disclosure_policy"
    start = starting_policy("site-1 policy")
    assert problems_of(start) == []
    policy = read_policy(write(tmp_path / "s.json", start))
    assert policy.metrics.allows("x") and policy.disclose == "full" and policy.system_metrics


@pytest.mark.parametrize(
    "data, problem",
    [
        ([], "must be a JSON object"),
        ({"metric": {}}, "metric: unknown key"),
        ({"name": ""}, "name: must be a non-empty text"),
        ({"system_metrics": "no"}, "system_metrics: must be true or false"),
        ({"metrics": []}, "metrics: must be an object"),
        ({"metrics": {"allow": "*loss*"}}, "metrics.allow: must be a list of name patterns"),
        ({"params": {"deny": [""]}}, "params.deny: must be a list of name patterns"),
        ({"tags": {"only": []}}, "tags.only: unknown key"),
        ({"metrics": {"min_validation_samples": -1}}, "metrics.min_validation_samples: must be an integer >= 0"),
        ({"metrics": {"coarsen": {"val_*": 0}}}, "metrics.coarsen.val_*: the step must be a number > 0"),
        ({"metrics": {"noise": {"a": {"mechanism": "dp"}}}}, "metrics.noise.a: must be {"),
        ({"metrics": {"noise": {"a": {"mechanism": "dp", "scale": 1}}}}, "metrics.noise.a.mechanism: must be one of"),
        ({"metrics": {"noise": {"a": {"mechanism": "gaussian", "scale": -1}}}}, "metrics.noise.a.scale: must be"),
        ({"datasets": {"disclose": "some"}}, "datasets.disclose: must be one of full, counts, none"),
        ({"datasets": {"min_label_count": 2.5}}, "datasets.min_label_count: must be an integer >= 0"),
    ],
)
def test_each_problem_is_one_line_naming_where_and_the_file(tmp_path, data, problem):
    problems = problems_of(data)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    path = write(tmp_path / "disclosure_policy.json", data)
    with pytest.raises(PolicyError) as e:
        read_policy(path)
    assert str(e.value) == f"disclosure policy {path}: {problems[0]}" and "\n" not in str(e.value)


def test_several_problems_are_each_listed_and_the_error_points_to_the_check(tmp_path):
    data = {"metrics": {"allow": 1}, "datasets": {"disclose": "x"}, "extra": 1}
    assert len(problems_of(data)) == 3
    path = write(tmp_path / "p.json", data)
    with pytest.raises(PolicyError, match=r"\(and 2 more: flctl policy check .*p\.json\)$"):
        read_policy(path)


def test_a_file_that_is_not_json_or_cannot_be_read_says_where(tmp_path):
    path = write(tmp_path / "p.json", '{"name": "a",\n "metrics": {allow}}')
    with pytest.raises(PolicyError, match=r"p\.json: not JSON: .* at line 2 column"):
        read_policy(path)
    with pytest.raises(PolicyError, match=r"missing\.json: cannot be read \(FileNotFoundError"):
        read_policy(tmp_path / "missing.json")
