"""build_components on its own: one component spec imported, checked against its class and built as
FLARE builds it, or one line naming what is wrong and where. (flctl check runs it over whole jobs:
test_check_job.py.)"""

import pytest

from flctl.build_components import Problems, build, check_arguments, origin

CONFIG = "app/config/config_fed_server.json"
WHERE = f"{CONFIG}: components[0] (id 'c')"
SAG = "nvflare.app_common.workflows.scatter_and_gather.ScatterAndGather"


class Widget:
    def __init__(self, size: int, colour: str = "red"):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.colour = size, colour


class Holder:
    def __init__(self, part, label: str = ""):
        self.part, self.label = part, label


class Base:
    def __init__(self, rate: float, steps: int = 1):
        self.rate, self.steps = rate, steps


class PassesOn(Base):
    """Its **kwargs go to a base that names its arguments (as PTExecutor's go to LightningExecutor)."""

    def __init__(self, extra: int = 0, **kwargs):
        super().__init__(**kwargs)


class Keeps:
    """Its **kwargs are its own (a LightningModule's save_hyperparameters pattern)."""

    def __init__(self, width: int, **hparams):
        self.width, self.hparams = width, hparams


class KeepsToo(Keeps):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)


def path_of(cls) -> str:
    return f"{__name__}.{cls.__name__}"


def built(spec: dict, raw: dict | None = None):
    """(what build returns, its problems) for spec as the config holds it (raw: before substitution)."""
    problems = Problems()
    return build(spec, spec if raw is None else raw, WHERE, CONFIG, problems), problems


def test_problems_keep_one_line_per_distinct_problem_with_where_first():
    problems = Problems()
    problems.add(CONFIG, "variable min_clients: min_clients must be >= 1, got 0")
    problems.append(f"{CONFIG}: variable min_clients: min_clients must be >= 1, got 0")
    problems.add("meta.json", "missing")
    assert problems == [f"{CONFIG}: variable min_clients: min_clients must be >= 1, got 0", "meta.json: missing"]


def test_a_spec_builds_its_class_with_its_arguments_and_name_stands_in_for_path():
    widget, problems = built({"path": path_of(Widget), "args": {"size": 2, "colour": "blue"}})
    assert problems == [] and (widget.size, widget.colour) == (2, "blue")
    widget, problems = built({"name": path_of(Widget), "args": {"size": 3}})
    assert problems == [] and widget.size == 3


@pytest.mark.parametrize("spec", [{"args": {}}, {"path": 3}, {"path": None, "name": ["a.B"]}])
def test_a_spec_without_a_class_path_is_one_line(spec):
    assert built(spec) == (None, [f'{WHERE}: no class path ("path")'])


@pytest.mark.parametrize(
    "class_path, expected",
    [
        ("Widget", "class path 'Widget' does not import: ImportError: 'Widget' is not a module.Class path"),
        ("json.NoSuchClass", "class path 'json.NoSuchClass' does not import: ImportError: module 'json' has no "
                             "'NoSuchClass'"),
        ("no_such_package_x.Net", "class path 'no_such_package_x.Net' does not import: ModuleNotFoundError: "
                                  "No module named 'no_such_package_x'"),
        # a path that stops at a module (the class name left off), or names a constant
        ("json.decoder", "the class path names module 'json.decoder', not a class"),
        ("math.pi", "the class path names a float, not a class"),
    ],
)  # fmt: skip
def test_a_class_path_that_names_no_class_is_one_line_naming_it(class_path, expected):
    assert built({"path": class_path, "args": {}}) == (None, [f"{WHERE}: {expected}"])


def test_a_module_that_fails_on_import_is_reported_in_its_own_words(tmp_path, monkeypatch):
    (tmp_path / "site_code_that_fails.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert built({"path": "site_code_that_fails.Net"}) == (
        None,
        [f"{WHERE}: class path 'site_code_that_fails.Net' does not import: RuntimeError: needs a GPU"],
    )


def test_args_that_are_not_an_object_are_one_line():
    assert built({"path": path_of(Widget), "args": [2]}) == (None, [f"{WHERE}.args: must be an object, got list"])


def test_a_missing_args_is_no_arguments():
    assert built({"path": path_of(Widget), "args": None}) == (None, [f"{WHERE}.args: Widget needs argument 'size'"])


@pytest.mark.parametrize(
    "name, value, low",
    [("num_rounds", 0, 1), ("num_rounds", True, 1), ("num_rounds", "2", 1), ("min_clients", -1, 1),
     ("train_timeout", -0.5, 0), ("start_round", -1, 0)],
)  # fmt: skip
def test_a_range_flare_does_not_check_is_named_at_the_argument_written_in_place(name, value, low):
    assert built({"path": SAG, "args": {name: value}}) == (
        None,
        [f"{WHERE}.args.{name}: {name} must be >= {low}, got {value!r}"],
    )


def test_values_in_range_build_flares_own_class():
    sag, problems = built({"path": SAG, "args": {"num_rounds": 1, "min_clients": 1, "train_timeout": 0}})
    assert problems == [] and type(sag).__name__ == "ScatterAndGather"


def test_a_range_in_a_nested_component_is_named_at_the_variable_the_config_used():
    spec = {"path": path_of(Holder), "args": {"part": {"path": SAG, "args": {"num_rounds": 0}}}}
    raw = {"path": path_of(Holder), "args": {"part": {"path": SAG, "args": {"num_rounds": "{rounds}"}}}}
    assert built(spec, raw) == (None, [f"{CONFIG}: variable rounds: num_rounds must be >= 1, got 0"])
    assert built(spec) == (None, [f"{WHERE}.args.part.args.num_rounds: num_rounds must be >= 1, got 0"])


def test_nested_components_are_built_first_and_handed_to_their_parent():
    spec = {"path": path_of(Holder), "args": {"part": {"path": path_of(Widget), "args": {"size": 4}}, "label": "x"}}
    holder, problems = built(spec)
    assert problems == [] and isinstance(holder.part, Widget) and holder.part.size == 4 and holder.label == "x"
    # a plain object (no "path") is an argument, not a component
    holder, problems = built({"path": path_of(Holder), "args": {"part": {"size": 4}}})
    assert problems == [] and holder.part == {"size": 4}


@pytest.mark.parametrize(
    "inner_args, expected",
    [
        ({"size": 4, "colur": "red"}, ".args.part.args: Widget has no argument 'colur' (did you mean 'colour'?)"),
        ({"size": 0}, ".args.part: Widget refused its arguments: ValueError: size must be >= 1, got 0"),
    ],
)
def test_a_nested_component_that_fails_builds_nothing_and_is_named_at_its_argument(inner_args, expected):
    spec = {"path": path_of(Holder), "args": {"part": {"path": path_of(Widget), "args": inner_args}}}
    assert built(spec) == (None, [WHERE + expected])


def test_an_argument_with_no_close_name_lists_every_argument_the_class_takes():
    problems = Problems()
    assert not check_arguments(Widget, {"size": 1, "zzz": 2}, "w", problems)
    assert problems == ["w.args: Widget has no argument 'zzz'; it takes ['colour', 'size']"]


def test_a_class_passing_its_keywords_to_a_base_takes_the_bases_arguments_and_no_others():
    problems = Problems()
    assert check_arguments(PassesOn, {"extra": 1, "rate": 0.1, "steps": 2}, "w", problems) and problems == []
    assert not check_arguments(PassesOn, {"rat": 0.1}, "w", problems)
    assert problems == ["w.args: PassesOn has no argument 'rat' (did you mean 'rate'?)"]


def test_a_class_or_function_that_keeps_its_keywords_takes_any_argument_but_still_needs_its_own():
    def factory(**settings):
        return settings

    problems = Problems()
    for taker in (Keeps, KeepsToo):
        assert check_arguments(taker, {"width": 8, "depth": 3}, "w", problems)
    assert check_arguments(factory, {"depth": 3}, "w", problems) and problems == []
    assert not check_arguments(Keeps, {"depth": 3}, "w", problems)
    assert problems == ["w.args: Keeps needs argument 'width'"]
    keeps, problems = built({"path": path_of(KeepsToo), "args": {"width": 8, "depth": 3}})
    assert problems == [] and keeps.hparams == {"depth": 3}


class Settings(dict):
    def __init__(self, **entries):
        super().__init__(**entries)


def test_a_builtin_without_a_signature_is_left_to_its_constructor():
    problems = Problems()
    assert check_arguments(dict, {"anything": 1}, "w", problems) and problems == []
    assert check_arguments(Settings, {"anything": 1}, "w", problems) and problems == []  # a builtin base too
    assert built({"path": "builtins.dict", "args": {"a": 1}}) == ({"a": 1}, [])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("{rounds}", f"{CONFIG}: variable rounds"),
        ("{rounds}0", "where.args.num_rounds"),  # part of a string: the argument is at fault
        (0, "where.args.num_rounds"),
        (None, "where.args.num_rounds"),
    ],
)
def test_origin_names_the_variable_only_for_a_value_that_is_exactly_one_reference(raw, expected):
    assert origin(raw, "where", "num_rounds", CONFIG) == expected
