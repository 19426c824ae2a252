"""Build a job's components as FLARE would, checking each against its class first.

Imports each class path (site code from the job's app/custom first on sys.path, set by the
caller), checks the arguments against the constructor's signature (with a "did you mean"),
the ranges FLARE itself does not check, then constructs it, nested components first.
"""

import difflib
import importlib
import inspect
import re

VAR_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Arguments of FLARE's own classes whose ranges FLARE does not check itself.
RANGES = {
    "ScatterAndGather": {"num_rounds": 1, "min_clients": 1, "train_timeout": 0, "start_round": 0},
    "ScatterAndGatherScaffold": {"num_rounds": 1, "min_clients": 1, "train_timeout": 0, "start_round": 0},
    "ResumableScaffold": {"num_rounds": 1, "min_clients": 1, "train_timeout": 0, "start_round": 0},
    "MinClientsGuard": {"min_clients": 1, "train_timeout": 0},
    "CrossSiteModelEval": {"submit_model_timeout": 0, "validation_timeout": 0},
    "CrossSiteEval": {"submit_model_timeout": 0, "validation_timeout": 0},
}


class Problems(list):
    """One line per problem; a variable used by several components is reported once."""

    def append(self, line):
        if line not in self:
            super().append(line)

    def add(self, where, text):
        self.append(f"{where}: {text}")


def origin(raw, where: str, name: str, path) -> str:
    """Where a value comes from: the top-level variable it names, else the argument itself."""
    whole = VAR_REF.fullmatch(raw) if isinstance(raw, str) else None
    return f"{path}: variable {whole.group(1)}" if whole else f"{where}.args.{name}"


def import_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ImportError(f"{class_path!r} is not a module.Class path")
    obj = getattr(importlib.import_module(module), name, None)
    if obj is None:
        raise ImportError(f"module {module!r} has no {name!r}")
    return obj


def build(spec: dict, raw: dict, where: str, path, problems: Problems):
    """Import, check the arguments against the signature, then construct; None on a problem.
    spec has the variables substituted; raw is as written (to name the variable at fault)."""
    class_path = spec.get("path") or spec.get("name")
    if not isinstance(class_path, str):
        problems.append(f'{where}: no class path ("path")')
        return None
    try:
        cls = import_class(class_path)
    except Exception as e:  # any import-time failure is the user's to see, in one line
        problems.append(f"{where}: class path {class_path!r} does not import: {type(e).__name__}: {e}")
        return None
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        problems.append(f"{where}.args: must be an object, got {type(args).__name__}")
        return None
    ok = check_arguments(cls, args, where, problems)
    raw_args = raw.get("args") if isinstance(raw.get("args"), dict) else {}
    for name, low in RANGES.get(getattr(cls, "__name__", None), {}).items():
        value = args.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < low):
            problems.append(f"{origin(raw_args.get(name), where, name, path)}: {name} must be >= {low}, got {value!r}")
            ok = False
    if not ok:
        return None
    built = {}
    for name, value in args.items():  # nested components, e.g. the persistor's model
        # FLARE builds a nested {"path": ...} too, unless it says "config_type": "dict" (passed as is,
        # e.g. FedOpt's optimizer_args, built later by the component with its own arguments).
        if isinstance(value, dict) and "path" in value and value.get("config_type", "component") == "component":
            built[name] = build(value, raw_args.get(name) or {}, f"{where}.args.{name}", path, problems)
            if built[name] is None:
                return None
        else:
            built[name] = value
    try:
        return cls(**built)
    except Exception as e:
        problems.append(f"{where}: {cls.__name__} refused its arguments: {type(e).__name__}: {e}")
        return None


def check_arguments(cls, args: dict, where: str, problems: Problems, filled=()) -> bool:
    """Every argument one cls takes (with a "did you mean"), none it requires missing; filled:
    arguments the caller supplies itself (the engine fills in a DataModule's site)."""
    try:
        params = inspect.signature(cls).parameters
    except TypeError:  # not callable: e.g. a class path that stops at the module
        what = f"module {cls.__name__!r}" if inspect.ismodule(cls) else f"a {type(cls).__name__}"
        problems.append(f"{where}: the class path names {what}, not a class")
        return False
    except ValueError:  # a builtin without a signature (e.g. builtins.dict): its constructor judges
        return True
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if takes_any:  # e.g. PTExecutor(**kwargs) -> LightningExecutor: the base's arguments
        inits = [b for b in getattr(cls, "__mro__", ()) if "__init__" in vars(b)]  # [its own, its base's, ...]
        base = inits[1] if len(inits) > 1 else object
        try:
            base_params = None if base is object else inspect.signature(base).parameters
        except ValueError:  # a builtin base without a signature
            base_params = None
        if base_params is None or any(p.kind == p.VAR_KEYWORD for p in base_params.values()):
            named = None  # its **kwargs go to no named arguments (kept, or passed on to any): all taken
        else:
            named += [n for n in base_params if n not in named and n != "self"]
    ok = True
    for name in args:
        if named is not None and name not in named:
            close = difflib.get_close_matches(name, named, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; it takes {sorted(named)}"
            problems.append(f"{where}.args: {cls.__name__} has no argument {name!r}{hint}")
            ok = False
    for name, p in params.items():
        required = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if required and name not in args and name not in filled:
            problems.append(f"{where}.args: {cls.__name__} needs argument {name!r}")
            ok = False
    return ok
