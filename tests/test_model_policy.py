"""The tracker's log_models setting: which rounds' global models become LoggedModels."""

import pytest

from fl_lightning_mlflow.server.model_policy import ModelPolicy, ModelPolicyError


@pytest.mark.parametrize(
    "value,logged",
    [
        ("best_and_final", []),  # the best and the final only, at job end
        ("every_round", [0, 1, 2, 3, 4, 5]),
        ("every_k:1", [0, 1, 2, 3, 4, 5]),
        ("every_k:3", [2, 5]),  # the k-th, 2k-th... round (rounds count from 0)
        (" every_k:2 ", [1, 3, 5]),
    ],
)
def test_rounds_logged_at_round_end(value, logged):
    policy = ModelPolicy.parse(value)
    assert [r for r in range(6) if policy.logs_round(r)] == logged


@pytest.mark.parametrize("value", ["", "every", "every_k:", "every_k:0", "every_k:-1", "every_k:x", "all", None, 3])
def test_an_unknown_value_is_one_line_naming_the_setting_and_its_owner(value):
    with pytest.raises(ModelPolicyError) as e:
        ModelPolicy.parse(value)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(
        "FederatedMLflowTracker: log_models must be 'best_and_final', 'every_round' or 'every_k:<k>'"
    )
    assert message.endswith(f"got {value!r}")


def test_a_round_that_is_not_a_number_is_not_logged():
    assert not ModelPolicy.parse("every_round").logs_round(None)
