"""YAML injection rules: which module runs where, with which operator.

A rule file is a mapping with `default_device`, optional `dtype`, and `rules`, an ordered
list. Each rule has `match` (`name`: a regex matched against the whole dotted module
path, and/or `class`: class name or import path), `replace` (`class`: an operator from
`hybrid/operators/` or `default`; `kwargs`), and optional `recursive` (default true). The first
matching rule wins; an unmatched module inherits its parent's placement. An operator owns
its whole subtree, except one that keeps its children (`keeps_children`, e.g. the layer
list's `CPUDecoderStack`): their rules place them, and it is built after them. Optional
`cudnn_attention` (true/false) and `torch_threads` (a count) are process-wide torch
settings applied when a model is loaded under the file; a file that names neither leaves
torch as it is. Everything is checked before any weight is read; errors name the rule
number and file line.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import yaml
from torch import nn

log = logging.getLogger(__name__)

_TOP_KEYS = {"default_device", "dtype", "rules", "description", "cudnn_attention", "torch_threads"}
_RULE_KEYS = {"match", "replace", "recursive"}
_MATCH_KEYS = {"name", "class"}
_REPLACE_KEYS = {"class", "kwargs"}
_PLACEMENT_KWARGS = {"device", "dtype"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RuleError(ValueError):
    """A rule file that cannot be used; the message names the file, rule and line."""


@dataclass
class Rule:
    index: int  # 1-based position in the file
    line: int
    name: re.Pattern | None
    cls: str | None
    replace: str  # "default" or an operator import path
    kwargs: dict
    recursive: bool = True
    operator: type | None = None

    def where(self, source: str) -> str:
        return f"{source}: rule {self.index} (line {self.line})"

    def matches(self, path: str, module: nn.Module) -> bool:
        if self.name is not None and not self.name.fullmatch(path):
            return False
        if self.cls is not None:
            t = type(module)
            if self.cls not in (t.__name__, f"{t.__module__}.{t.__qualname__}"):
                return False
        return True

    @property
    def device(self) -> str | None:
        return self.kwargs.get("device", self.kwargs.get("generate_device"))


@dataclass
class RuleSet:
    rules: list[Rule]
    default_device: str = "cpu"
    dtype: torch.dtype = torch.float32
    source: str = "<rules>"
    description: str = ""
    assumed: dict[str, int] = field(default_factory=dict)  # GPUs planned for without being present: device -> bytes
    cudnn_attention: bool | None = None  # process-wide, set at load (`apply_process_settings`); None: left as it is
    torch_threads: int | None = None  # torch's thread count, set by the Model (`Model.set_torch_threads`); None: left


@dataclass
class Placement:
    """What the rules decided for one module."""

    path: str
    module: nn.Module
    device: str
    dtype: torch.dtype
    rule: Rule | None  # None: inherited from the parent (or the file's default)
    operator: type | None = None
    kwargs: dict = field(default_factory=dict)
    fallback: list[str] = field(default_factory=list)  # operator rules that matched but could not take it, and why

    @property
    def keeps_children(self) -> bool:
        """Whether the operator here keeps the module's children, which have placements of
        their own (it holds no tensors itself)."""
        return getattr(self.operator, "keeps_children", False)


# ------------------------------------------------------------------------- parsing


class _LineLoader(yaml.SafeLoader):
    """Keeps the line of every mapping so errors can point at it."""


def _construct_mapping(loader, node):
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def builtin_rules_dir() -> Path:
    return Path(str(resources.files("hybrid.rules")))


def resolve_rules_path(spec: str | Path) -> Path:
    """A rule file path, or the name of a built-in one (with or without .yaml)."""
    p = Path(spec)
    if p.exists():
        return p
    builtin = builtin_rules_dir() / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if builtin.exists():
        return builtin
    names = ", ".join(sorted(f.stem for f in builtin_rules_dir().glob("*.yaml")))
    raise RuleError(f"rule file {spec}: not found (built-in rule files: {names})")


def device_key(device) -> str:
    """One spelling per device: 'cuda' is 'cuda:0'."""
    d = torch.device(device)
    return f"cuda:{d.index or 0}" if d.type == "cuda" else str(d)


def parse_rules(spec, family: str | None = None, assume: dict[str, int] | None = None) -> RuleSet:
    """Parse and check a rule file (path or built-in name), a YAML string, or a list of
    rule dicts. Checks keys, regexes, operators, operator kwargs and devices. `family`
    (e.g. "mixtral") lets a device error name the CPU rule file to use instead. `assume`
    (device -> bytes, e.g. {"cuda:0": 8 << 30}): GPUs to plan for as if present (`hybrid
    rules --assume-gpu`); such a rule set is for planning, not for loading."""
    assumed = {device_key(d): int(b) for d, b in (assume or {}).items()}
    if isinstance(spec, RuleSet):
        return spec
    if isinstance(spec, (list, dict)):
        data, source = spec, "<rules>"
        if isinstance(data, list):
            data = {"rules": data}
    else:
        text = str(spec)
        if "\n" in text or text.lstrip().startswith(("-", "{", "rules:")):
            source = "<rules>"
        else:
            path = resolve_rules_path(text)
            source, text = str(path), path.read_text()
        try:
            data = yaml.load(text, Loader=_LineLoader)
        except yaml.YAMLError as e:
            raise RuleError(f"{source}: not valid YAML: {e}") from e
        if isinstance(data, list):
            data = {"rules": data, "__line__": 1}
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list):
        raise RuleError(f"{source}: expected a mapping with a 'rules' list")
    unknown = set(data) - _TOP_KEYS - {"__line__"}
    if unknown:
        raise RuleError(f"{source}: unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    dtype_name = data.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise RuleError(f"{source}: dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    if family is None:
        from hybrid.models import family_names

        family = next((f for f in family_names() if Path(source).name.startswith(f + "-")), None)
    cudnn = data.get("cudnn_attention")
    if cudnn is not None and not isinstance(cudnn, bool):
        raise RuleError(f"{source}: cudnn_attention must be true or false, not {cudnn!r}")
    torch_threads = data.get("torch_threads")
    if torch_threads is not None and (isinstance(torch_threads, bool) or not isinstance(torch_threads, int) or torch_threads < 1):
        raise RuleError(f"{source}: torch_threads must be a whole number of threads, 1 or more, not {torch_threads!r}")
    default_device = str(data.get("default_device", "cpu"))
    _check_device(default_device, f"{source}: default_device", family, assumed)
    rules = [_parse_rule(r, i + 1, source, family, assumed) for i, r in enumerate(data["rules"])]
    return RuleSet(rules, default_device, DTYPES[dtype_name], source, data.get("description", ""), assumed, cudnn,
                   torch_threads)


def _parse_rule(raw, index: int, source: str, family: str | None = None, assumed: dict | None = None) -> Rule:
    line = raw.get("__line__", 0) if isinstance(raw, dict) else 0
    where = f"{source}: rule {index} (line {line})"
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: a rule must be a mapping with 'match' and 'replace'")
    raw = {k: v for k, v in raw.items() if k != "__line__"}
    _only(raw, _RULE_KEYS, where, "rule")
    match = raw.get("match")
    if not isinstance(match, dict) or not ({"name", "class"} & set(match)):
        raise RuleError(f"{where}: 'match' needs 'name' (regex) and/or 'class'")
    match = {k: v for k, v in match.items() if k != "__line__"}
    _only(match, _MATCH_KEYS, where, "match")
    pattern = None
    if "name" in match:
        try:
            pattern = re.compile(str(match["name"]))
        except re.error as e:
            raise RuleError(f"{where}: invalid regex {match['name']!r}: {e}") from e
    replace = raw.get("replace", {"class": "default"})
    if not isinstance(replace, dict):
        raise RuleError(f"{where}: 'replace' must be a mapping with 'class' and optional 'kwargs'")
    replace = {k: v for k, v in replace.items() if k != "__line__"}
    _only(replace, _REPLACE_KEYS, where, "replace")
    kwargs = {k: v for k, v in (replace.get("kwargs") or {}).items() if k != "__line__"}
    recursive = raw.get("recursive", True)
    if not isinstance(recursive, bool):
        raise RuleError(f"{where}: 'recursive' must be true or false")
    rule = Rule(index, line, pattern, match.get("class"), str(replace.get("class", "default")), kwargs, recursive)
    if rule.replace == "default":
        _only(kwargs, _PLACEMENT_KWARGS, where, "kwargs of 'default'")
    else:
        rule.operator = _find_operator(rule.replace, where)
        _check_kwargs(rule.operator, kwargs, where)
    for key in ("device", "generate_device", "prefill_device"):
        if key in kwargs:
            _check_device(str(kwargs[key]), where if key == "device" else f"{where}: {key}", family, assumed)
    if "dtype" in kwargs and kwargs["dtype"] not in DTYPES:
        raise RuleError(f"{where}: dtype {kwargs['dtype']!r} is not one of {sorted(DTYPES)}")
    return rule


def _only(d: dict, allowed: set, where: str, what: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise RuleError(f"{where}: unknown key(s) {sorted(unknown)} in {what}; allowed: {sorted(allowed)}")


def _find_operator(name: str, where: str) -> type:
    from hybrid import operators

    if name in operators.OPERATORS:
        return operators.OPERATORS[name]
    if "." in name:
        mod, _, attr = name.rpartition(".")
        try:
            op = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            op = None
        if isinstance(op, type) and issubclass(op, nn.Module):
            return op
    raise RuleError(
        f"{where}: unknown operator {name!r}; available: default, {', '.join(sorted(operators.OPERATORS))}"
    )


def _check_kwargs(op: type, kwargs: dict, where: str) -> None:
    params = inspect.signature(op.__init__).parameters
    accepted = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY}
    unknown = set(kwargs) - accepted
    if unknown:
        raise RuleError(
            f"{where}: operator {op.__name__} does not accept {sorted(unknown)}; it accepts {sorted(accepted)}"
        )
    if hasattr(op, "check_kwargs"):
        try:
            op.check_kwargs(**kwargs)
        except ValueError as e:
            raise RuleError(f"{where}: {e}") from e


def cpu_rules_hint(family: str | None) -> str:
    if family:
        return f"use the CPU rule file instead: --rules {family}-cpu ({builtin_rules_dir() / (family + '-cpu.yaml')})"
    return "use a CPU rule file instead (--rules <family>-cpu; with no --rules the right one is chosen)"


def _check_device(device: str, where: str, family: str | None = None, assumed: dict | None = None) -> None:
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise RuleError(f"{where}: {device!r} is not a device name (cpu, cuda, cuda:N)") from e
    if d.type == "cpu":
        return
    if d.type != "cuda":
        raise RuleError(f"{where}: device {device!r} is not supported (cpu, cuda, cuda:N)")
    if assumed:
        if device_key(d) not in assumed:
            raise RuleError(f"{where}: device {device!r} is not among the GPUs assumed ({', '.join(sorted(assumed))})")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise RuleError(f"{where}: device {device!r} but this machine has no CUDA device; {cpu_rules_hint(family)}")
    if (d.index or 0) >= count:
        raise RuleError(f"{where}: device {device!r} but this machine has {count} CUDA device(s)")


# ------------------------------------------------------------------------ planning


def plan(root: nn.Module, ruleset: RuleSet, tensor=None) -> tuple[list[Placement], dict[int, int]]:
    """Decide every module's placement (pre-order) without changing the tree. Returns the
    placements and, per rule index, how many modules it matched.

    tensor(full_name) -> (GGML type, shape) or None: what the checkpoint holds, so that an
    operator that cannot take a module's shapes (`Operator.refusal`) is passed over for the
    next matching rule, or torch; the placement's `fallback` says which and why."""
    placements: list[Placement] = []
    counts = {r.index: 0 for r in ruleset.rules}

    def refusal(rule: Rule, path: str, module: nn.Module) -> str | None:
        check = getattr(rule.operator, "refusal", None)
        if tensor is None or check is None:
            return None
        prefix = f"{path}." if path else ""
        reason = check(module, lambda n: tensor(prefix + n), rule.kwargs)
        return f"{rule.where(ruleset.source)}: {rule.operator.__name__}: {reason}" if reason else None

    def check_fits(rule: Rule, path: str, module: nn.Module) -> None:
        fits = getattr(rule.operator, "replaces", ())
        if fits and not isinstance(module, fits):
            names = ", ".join(c.__name__ for c in fits)
            raise RuleError(
                f"{rule.where(ruleset.source)}: operator {rule.operator.__name__} replaces {names}, "
                f"but {path} is a {type(module).__name__}"
            )

    def visit(path: str, module: nn.Module, device: str, dtype: torch.dtype) -> None:
        declined, rule = [], None
        for r in ruleset.rules:
            if not path or not r.matches(path, module):
                continue
            counts[r.index] += 1
            if r.operator is None:
                rule = r
                break
            check_fits(r, path, module)
            reason = refusal(r, path, module)
            if reason is None:
                rule = r
                break
            if not declined and r.device is not None:
                device = str(r.device)  # torch runs it where the operator would have
            declined.append(reason)
            log.info("%s: %s; the next matching rule or torch takes it", path, reason)
        if rule is not None:
            device = str(rule.kwargs.get("device", rule.kwargs.get("generate_device", device)))
            dtype = DTYPES[rule.kwargs["dtype"]] if "dtype" in rule.kwargs else dtype
            if rule.operator is not None:
                placements.append(Placement(path, module, device, dtype, rule, rule.operator, dict(rule.kwargs), declined))
                if not placements[-1].keeps_children:
                    return  # an operator owns its whole subtree
        if rule is None or rule.operator is None:
            placements.append(Placement(path, module, device, dtype, rule, fallback=declined))
        if rule is not None and not rule.recursive:
            return
        for name, child in module.named_children():
            visit(f"{path}.{name}" if path else name, child, device, dtype)

    visit("", root, ruleset.default_device, ruleset.dtype)
    for r in ruleset.rules:
        if counts[r.index] == 0:
            log.warning("%s matches no module", r.where(ruleset.source))
    return placements, counts


def swap(root: nn.Module, placements: list[Placement], config, source: str = "<rules>") -> None:
    """Replace every module an operator was chosen for (after planning: the tree is never
    changed while it is walked). The operator builds itself from the module and config;
    one that cannot take the module it matched (ValueError) names the rule that chose it.
    Deeper modules first: an operator that keeps its children is built from them once
    they are operators themselves."""
    for p in sorted(placements, key=lambda p: -p.path.count(".")):
        if p.operator is None:
            continue
        try:
            op = p.operator(p.module, config, **p.kwargs)
        except ValueError as e:
            raise RuleError(f"{p.rule.where(source)}: {p.path}: {e}") from e
        parent_path, _, name = p.path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        setattr(parent, name, op)
        p.module = op


def apply_process_settings(ruleset: RuleSet) -> None:
    """The process-wide torch settings a rule file asks for, applied when a model is loaded
    under it; a file that names none changes nothing. `cudnn_attention: false` (the built-in
    GPU files): torch's attention takes flash or memory-efficient kernels instead of cuDNN,
    which builds a new plan for every key length, i.e. at every decode step."""
    if ruleset.cudnn_attention is not None:
        torch.backends.cuda.enable_cudnn_sdp(ruleset.cudnn_attention)


def _move(x, device):
    if isinstance(x, torch.Tensor) or hasattr(x, "positions"):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_move(v, device) for v in x)
    if isinstance(x, list):
        return [_move(v, device) for v in x]
    return x


def add_device_hooks(root: nn.Module, placements: list[Placement]) -> None:
    """Where a module runs on another device than its parent, move its inputs there and
    its output back, so model code never deals with devices."""
    device_of = {p.path: p.device for p in placements}
    for p in placements:
        if not p.path or p.operator is not None:
            continue  # operators move their own activations
        parent = device_of.get(p.path.rpartition(".")[0], p.device)
        if torch.device(parent) == torch.device(p.device):
            continue
        target, back = torch.device(p.device), torch.device(parent)
        p.module.register_forward_pre_hook(lambda m, args, t=target: _move(args, t))
        p.module.register_forward_hook(lambda m, args, out, b=back: _move(out, b))


def inject(module: nn.Module, rules, config=None) -> list[Placement]:
    """Apply rules to a module tree already in memory (weights present): swap operators
    in, taking their weights from the replaced modules, and place the rest."""
    from hybrid.operators.base import tensor_info

    ruleset = parse_rules(rules)
    params = dict(module.named_parameters())
    placements, _ = plan(module, ruleset, lambda name: tensor_info(params[name]) if name in params else None)
    originals = {p.path: p.module for p in placements if p.operator is not None}
    swap(module, placements, config, ruleset.source)
    apply_process_settings(ruleset)
    for p in placements:
        if p.keeps_children:
            continue  # its children have placements of their own
        if p.operator is not None:
            p.module.load_from_module(originals[p.path])
        else:
            for name, param in list(p.module.named_parameters(recurse=False)):
                p.module._parameters[name] = nn.Parameter(param.data.to(p.device, p.dtype), requires_grad=False)
    add_device_hooks(module, placements)
    return placements
