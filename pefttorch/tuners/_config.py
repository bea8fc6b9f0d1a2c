"""What every method's config shares: refusing unknown fields, and writing adapter_config.json."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import numbers
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"


class AnyValue:
    """A FOREIGN_FIELDS entry for a field that takes any value (it does not change what a loaded adapter computes);
    `default` (a value, or a factory of a fresh mutable one) is HF PEFT's, which the config reads back when the field
    was not given."""

    def __init__(self, default=None, factory=None):
        self.default, self.factory = default, factory


def _is_default(value, default) -> bool:
    try:
        return bool(value is default or value in (default, None, False, {}, []))
    except (TypeError, RuntimeError, ValueError):  # an array or tensor: its truth value is ambiguous
        return False


def reject_unknown_fields(cls):
    """Class decorator for a config dataclass: a misspelt field is an error that names it, suggests the
    closest field and lists them all (instead of dataclass's bare "unexpected keyword argument"). Fields of HF
    PEFT's config that pefttorch lacks (the class's ``FOREIGN_FIELDS``: name -> default) are accepted at their
    default, which HF PEFT code often spells out (``use_dora=False``), and refused in words otherwise."""
    init = cls.__init__
    names = [f.name for f in fields(cls) if f.init]

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        foreign = getattr(type(self), "FOREIGN_FIELDS", {})
        given = {}
        for k in [k for k in kwargs if k not in names and k in foreign]:
            given[k] = value = kwargs.pop(k)
            if not isinstance(foreign[k], AnyValue) and not _is_default(value, foreign[k]):
                raise ValueError(f"{cls.__name__}: {k}={value!r} is an HF PEFT feature that pefttorch does not "
                                 "implement")
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"{cls.__name__} got unknown field(s) {', '.join(hints)}; fields are: {', '.join(names)}")
        if given:
            self.__dict__["_hf_peft_fields"] = given
        init(self, *args, **kwargs)

    def foreign_field(self, name):
        # HF PEFT code reads its fields back (`if config.use_dora:`): they read as given, or as HF PEFT's default
        foreign = getattr(type(self), "FOREIGN_FIELDS", {})
        if name in foreign:
            given = self.__dict__.get("_hf_peft_fields", {})
            if name in given:
                return given[name]
            entry = foreign[name]
            if isinstance(entry, AnyValue) and entry.factory is not None:
                # a mutable default of this config's own, kept (one shared by every config leaked edits across them)
                return self.__dict__.setdefault("_hf_peft_fields", {}).setdefault(name, entry.factory())
            return entry.default if isinstance(entry, AnyValue) else entry
        raise AttributeError(f"{cls.__name__!r} object has no attribute {name!r}")

    def replace(self, **changes):
        """dataclasses.replace, keeping HF PEFT's fields given to this config (which it rebuilds without), with the
        fields the config derived from others (left None, filled in by __post_init__, listed in its `_derived`)
        derived again: they followed the old values (IncreLoRA's incre_rank_num after replace(target_rank=...))."""
        changes = {**{name: None for name in self.__dict__.get("_derived", ())}, **changes}
        copied = dataclasses.replace(self, **changes)
        if "_hf_peft_fields" in self.__dict__:
            copied.__dict__["_hf_peft_fields"] = dict(self.__dict__["_hf_peft_fields"])
        return copied

    cls.__init__ = checked_init
    if getattr(cls, "FOREIGN_FIELDS", None):
        cls.__getattr__ = foreign_field
    if not hasattr(cls, "replace"):  # (SavedConfig's own: its configs take no HF PEFT fields of their own)
        cls.replace = replace
    return cls


def save_config(config, directory: str | Path) -> None:
    """Writes ``config.to_dict()`` as ``directory/adapter_config.json``."""
    path = Path(directory) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # the fields sorted, not the dicts inside them: rank_pattern's and alpha_pattern's first matching key wins, and
    # sorted keys made another one win after a reload (another scaling in silence, or ranks that no longer fit)
    path.write_text(json.dumps(dict(sorted(config.to_dict().items())), indent=2) + "\n")


def read_config(path: Path) -> dict[str, Any]:
    """The fields of a saved adapter_config.json, its path named where it is not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON adapter config ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an adapter config is a JSON object, got a {type(data).__name__}")
    return data


def plain_number(value):
    """A number of any kind (numpy's np.int64 from a sweep over a numpy grid, np.float32, a 0-d tensor) as a Python
    int or float; a bool, or anything else, as it is, for the checks to refuse in their own words."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, numbers.Number):
        value = value.item()  # a 0-d tensor
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def plain_numbers(config, *dicts: str) -> None:
    """Every field of `config` that is a number, every number in its list or tuple fields (layers_to_transform:
    ``list(np.arange(2))``) and every value of its dict fields named in `dicts` becomes a Python int or float
    (:func:`plain_number`): HF PEFT and the functional ops take numpy's, the checks test for int and float, and the
    saved JSON must stay plain."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (list, tuple)):
            setattr(config, f.name, type(value)(plain_number(v) for v in value))
        else:
            setattr(config, f.name, plain_number(value))
    for name in dicts:
        value = getattr(config, name)
        if isinstance(value, dict):
            setattr(config, name, {k: plain_number(v) for k, v in value.items()})


def module_names(value, what: str, owner: str):
    """A list of names or a regex string (as HF PEFT takes them), or None. HF PEFT's shorthand for target_modules,
    "all-linear", in any case as HF PEFT compares it (it was taken as a regex matching nothing)."""
    if isinstance(value, str) and what == "target_modules" and value.lower() == "all-linear":
        return "all-linear"
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{owner}: {what} must be a list of module names, a regex or None, got {value!r}")


# HF PEFT's TaskType values; a config's task_type must be one (or None)
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

_FIELD_KINDS = {"bool": (bool, "True or False"), "int": (numbers.Integral, "a number"),
                "float": (numbers.Real, "a number")}


def check_field_types(config) -> None:
    """Every field annotated bool (or bool or None) holds one, and every field annotated int or float (or that or
    None) holds a number, in words naming the field: a string was stored and read as true ("false" for use_rslora
    turned rsLoRA on), or failed in a comparison naming nothing. (A bool or a float given for an int is left to the
    config's own checks, which say what the field takes.)"""
    for f in fields(config):
        kinds = [k.strip() for k in str(f.type).split("|")]
        optional = "None" in kinds
        kinds = [k for k in kinds if k != "None"]
        if len(kinds) != 1 or kinds[0] not in _FIELD_KINDS:
            continue
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        want, words = _FIELD_KINDS[kinds[0]]
        if not (isinstance(value, bool) if want is bool else isinstance(value, numbers.Real)):
            raise ValueError(f"{type(config).__name__}: {f.name} must be {words}{' or None' if optional else ''}, "
                             f"got {value!r}")


# As in HF PEFT: a classification or question-answering model's new head trains in full and is saved with the
# adapter (the names cover the model types; one match suffices).
# (pre_classifier: DistilBERT's head is two layers, both new; HF PEFT 0.22 names it, and writes it in its configs)
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ["classifier", "score", "pre_classifier"],
                        "TOKEN_CLS": ["classifier", "score", "pre_classifier"],
                        "QUESTION_ANS": ["qa_outputs"]}


def normalize_common(config, *dicts: str) -> None:
    """The fields most configs share: a single layer index or module name becomes a list, and a task's new head
    trains in full (HF PEFT's modules_to_save for SEQ_CLS, TOKEN_CLS and QUESTION_ANS, added to the user's). Numbers
    of any kind (also in the dict fields `dicts`) become plain first (:func:`plain_numbers`): configs call this before
    checking their own fields. The task type must be HF PEFT's (in upper case: "seq_cls" added no head, which
    stayed frozen and unsaved), and fields annotated bool, int or float must hold one (:func:`check_field_types`)."""
    plain_numbers(config, *dicts)
    check_field_types(config)
    if config.task_type is not None and config.task_type not in TASK_TYPES:
        raise ValueError(f"{type(config).__name__}: task_type must be one of {', '.join(TASK_TYPES)} or None, got "
                         f"{config.task_type!r}")
    layers = getattr(config, "layers_to_transform", None)
    if isinstance(layers, int) and not isinstance(layers, bool):
        config.layers_to_transform = layers = [layers]
    if layers is not None and not (isinstance(layers, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise ValueError(f"{type(config).__name__}: layers_to_transform must be a layer index or a list of them "
                         f"(integers >= 0), got {layers!r}")
    if layers is not None and not layers:
        # the tuners read an empty list as no restriction and adapted every layer; HF PEFT reads it as none (and
        # finds nothing to adapt)
        raise ValueError(f"{type(config).__name__}: layers_to_transform=[] selects no layer; give None (the "
                         "default) to adapt every layer")
    if isinstance(config.modules_to_save, str):
        config.modules_to_save = [config.modules_to_save]
    elif isinstance(config.modules_to_save, (set, frozenset)):  # (passed on to the JSON file, a set failed there)
        config.modules_to_save = sorted(config.modules_to_save)
    elif isinstance(config.modules_to_save, tuple):
        config.modules_to_save = list(config.modules_to_save)
    heads = TASK_MODULES_TO_SAVE.get(config.task_type)
    if heads:  # added to the user's own, as HF PEFT does (given a list, the new head stayed frozen and unsaved)
        have = list(config.modules_to_save or [])
        config.modules_to_save = have + [h for h in heads if h not in have]


# Fields of HF PEFT's adapter_config.json that are bookkeeping: they never change what an adapter computes.
PEFT_BOOKKEEPING = ("peft_type", "auto_mapping", "peft_version", "revision")


def warn_unknown_fields(kind: str, data: dict[str, Any], known) -> None:
    """Warns of fields of a saved config that pefttorch does not know (a newer HF PEFT's, most likely): they are
    dropped, and one that changes the computation would make the outputs differ from HF PEFT's without a word."""
    unknown = sorted(k for k in data if k not in known and k not in PEFT_BOOKKEEPING)
    if unknown:
        warnings.warn(f"{kind}: the saved config has field(s) {unknown} that pefttorch does not know (written by a "
                      f"newer HF PEFT?); they are ignored, and if they change what the adapter computes, its outputs "
                      f"will differ from HF PEFT's", UserWarning, stacklevel=3)


class SavedConfig:
    """to_dict / save / from_dict of a config dataclass whose JSON is HF PEFT's adapter_config.json (or ours in
    the same shape); subclasses set `peft_type_name` and may leave pefttorch-only fields out of the file."""

    peft_type_name: ClassVar[str]
    peft_only_fields: ClassVar[tuple[str, ...]] = ()  # pefttorch's fields that the saved format leaves out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in self.peft_only_fields:
            if d[name] is None:  # (an adapter's export writes them as HF PEFT's fields; set, they stay: from_dict
                d.pop(name)      # reads them back, where dropped, a config of layers_to_transform adapted every layer)
        d["peft_type"] = self.peft_type_name
        return d

    def save(self, directory) -> None:
        save_config(self, directory)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if data.get("peft_type") != cls.peft_type_name:
            raise ValueError(f"not a {cls.peft_type_name} config (peft_type {data.get('peft_type')!r})")
        names = {f.name for f in fields(cls) if f.init}
        warn_unknown_fields(cls.__name__, data, names)
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TargetedConfig(SavedConfig):
    """Fields of the methods that pick modules by name (HF PEFT's names); subclasses set `peft_type_name` and
    call `_check` in __post_init__."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def _check(self) -> None:
        owner = type(self).__name__
        self.target_modules = module_names(self.target_modules, "target_modules", owner)
        self.exclude_modules = module_names(self.exclude_modules, "exclude_modules", owner)
        normalize_common(self)
