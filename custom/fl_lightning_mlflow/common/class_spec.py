"""A user's class named in configuration: FLARE's nested-object form, built when we choose.

    {"path": "pkg.mod.Class", "config_type": "dict", "args": {...}}

is how a job names the user's LightningModule, LightningDataModule or network. "config_type":
"dict" is FLARE's own marker that keeps its component builder from building the object while it
reads the config: the engine builds it at setup, after seeding, and can fill in the site's name
(a DataModule cannot know which site it runs on at config time). An object FLARE has already
built (the marker left out) is taken as it is.

Every failure is one line naming the owner, the argument and the class path.
"""

import importlib
import inspect

SPEC_KEYS = ("path", "args", "config_type")


class SpecError(ValueError):
    """A class spec that cannot be imported or built; one line."""


def is_spec(value) -> bool:
    return isinstance(value, dict) and "path" in value


def check_spec(value, owner: str, name: str, required: bool = True) -> None:
    """The spec's shape, checked where it is given (the constructor that takes it)."""
    if value is None and not required:
        return
    if not is_spec(value):
        if isinstance(value, dict) or value is None or isinstance(value, (str, int, float, list)):
            raise SpecError(
                f'{owner}: {name} must be {{"path": "pkg.mod.Class", "config_type": "dict", "args": {{...}}}}, '
                f"got {str(value)[:80]!r}"
            )
        return  # an object FLARE built already
    unknown = sorted(set(value) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{owner}: {name} has unknown key(s) {unknown}; it takes {list(SPEC_KEYS)}")
    path = value["path"]
    if not isinstance(path, str) or "." not in path.strip("."):
        raise SpecError(f"{owner}: {name}.path must be a 'pkg.mod.Class' path, got {path!r}")
    if not isinstance(value.get("args", {}), dict):
        raise SpecError(f"{owner}: {name}.args must be an object, got {value.get('args')!r}")


def import_path(path: str, owner: str = "", name: str = ""):
    """The class (or factory) a dotted path names; SpecError naming what did not import."""
    where = f"{owner}: {name} " if owner else ""
    module, _, attr = path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), attr)
    except Exception as e:  # an import-time error of user code is the user's to see, in one line
        raise SpecError(f"{where}class path {path!r} does not import: {type(e).__name__}: {e}") from None
    return found


def takes(cls, arg: str) -> bool:
    """Whether cls's constructor takes arg by name (or any keyword)."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def build(value, owner: str, name: str, fill: dict | None = None):
    """The object a spec names, built with its args; fill: arguments the caller supplies when
    the constructor takes them and the args do not set them (e.g. {"site": "site-1"}). An
    object that is not a spec is returned as it is."""
    if not is_spec(value):
        return value
    check_spec(value, owner, name)
    cls = import_path(value["path"], owner, name)
    args = dict(value.get("args") or {})
    for arg, filled in (fill or {}).items():
        if arg not in args and takes(cls, arg):
            args[arg] = filled
    try:
        return cls(**args)
    except Exception as e:  # the user's constructor: its own words, in one line
        raise SpecError(f"{owner}: {name} {value['path']} refused its arguments: {type(e).__name__}: {e}") from None


def path_of(value) -> str:
    """The class path of a spec or of a built object."""
    if is_spec(value):
        return value["path"]
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"
