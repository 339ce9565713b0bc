"""Check a vLLM release against what the plugin expects of it, from the release's source alone.

Reads a vLLM wheel (or an unpacked source tree) without importing vLLM, so it runs for a release
that has no build for this machine, and reports every touch point that moved:

- the connector-base methods the plugin overrides (and the other vLLM classes it derives from and
  methods it wraps): present, with the parameters vLLM passes, and no abstract method left out;
- every name the plugin imports from vLLM (found by parsing the plugin's own modules, so the list
  never goes stale; `try: ... except ImportError:` fallbacks count as alternatives);
- the architectures the matcher knows (`matcher.MATCHED_ARCHITECTURES`): vLLM's registry still maps
  each to a class of vLLM's own, or to the Transformers backend where that is expected;
- the config fields the plugin reads (`vllm_config.model_config.X` and the like);
- the compile key covering `additional_config` (`compat.add_to_compile_key`);
- the `patches/` patch for this release applying without fuzz.

    python -m vllm_partial_kv.touchpoints WHEEL_OR_DIR
    python -m vllm_partial_kv.touchpoints --download 0.34.0   # or `latest`; cached, see WHEEL_CACHE_ENV

Exit status 1 on any unexpected difference.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PATCHES = PACKAGE.parent / "patches"  # in a checkout; absent from an installed wheel
WHEEL_CACHE_ENV = "VLLM_PARTIAL_KV_WHEEL_CACHE"

# Architectures vLLM serves by its Transformers backend rather than code of its own, where the
# plugin falls back to plain K/V: (last release checked with vLLM's own class, first checked on the
# backend); releases in between may be either.
TRANSFORMERS_BACKEND = {
    "GPTNeoXForCausalLM": ((0, 26), (0, 32)),
    "PhiForCausalLM": ((0, 26), (0, 32)),
    "StableLmForCausalLM": ((0, 33), (0, 34)),
}

# vLLM methods the plugin replaces on vLLM's classes (compat.wrap_model_loader, wrap_kv_budget):
# (file, class, method, the parameters the replacement takes).
WRAPPED = (
    ("vllm/model_executor/model_loader/base_loader.py", "BaseModelLoader", "load_model",
     ("self", "vllm_config", "model_config", "prefix")),
    ("vllm/v1/worker/gpu_worker.py", "Worker", "determine_available_memory", ("self",)),
    ("vllm/v1/worker/cpu_worker.py", "CPUWorker", "determine_available_memory", ("self",)),
)

# The objects whose attributes the plugin reads, by the names it gives them, and vLLM's classes.
CONFIGS = {
    "vllm_config": "VllmConfig",
    "_vllm_config": "VllmConfig",
    "model_config": "ModelConfig",
    "cache_config": "CacheConfig",
    "scheduler_config": "SchedulerConfig",
    "parallel_config": "ParallelConfig",
    "kv_transfer_config": "KVTransferConfig",
}
# Read by compat.compile_key on the releases that have them; checked under "compile key".
VERSIONED_FIELDS = {("VllmConfig", "compute_hash"), ("VllmConfig", "compile_factors")}
CONNECTOR_BASE = "KVConnectorBase_V1"
# Connector-base hooks that appeared in a later release than the oldest supported: the plugin may
# override them (older releases never call them). Hook -> first release that has it.
CONNECTOR_HOOKS_SINCE = {"may_load_async": (0, 34)}


class Source:
    """A vLLM release's files, by path from the directory that holds `vllm/`; remembers which
    paths the check used (`touched`), so a copy of just those is a complete source for it."""

    def __init__(self, location: Path) -> None:
        location = Path(location)
        self.touched: set[str] = set()
        self._zip: zipfile.ZipFile | None = None
        if location.is_file():
            self._zip = zipfile.ZipFile(location)
            self._names = set(self._zip.namelist())
            self.root = None
        else:
            self.root = location.parent if (location / "__init__.py").exists() and location.name == "vllm" else location
            if not (self.root / "vllm" / "__init__.py").exists():
                raise SystemExit(f"error: no vllm/ package in {location}")
        self._texts: dict[str, str | None] = {}
        self._trees: dict[str, ast.Module | None] = {}
        self.version = self._version()
        self.label = str(location)

    def exists(self, path: str) -> bool:
        found = path in self._names if self._zip else (self.root / path).is_file()
        if found:
            self.touched.add(path)
        return found

    def text(self, path: str) -> str | None:
        if path not in self._texts:
            if not self.exists(path):
                self._texts[path] = None
            elif self._zip:
                self._texts[path] = self._zip.read(path).decode()
            else:
                self._texts[path] = (self.root / path).read_text()
        return self._texts[path]

    def tree(self, path: str) -> ast.Module | None:
        if path not in self._trees:
            text = self.text(path)
            self._trees[path] = None if text is None else ast.parse(text, path)
        return self._trees[path]

    def listdir(self, folder: str) -> list[str]:
        """The .py files directly in `folder`."""
        if self._zip:
            return sorted(n for n in self._names if n.startswith(folder + "/") and "/" not in n[len(folder) + 1:]
                          and n.endswith(".py"))
        return sorted(f"{folder}/{p.name}" for p in (self.root / folder).glob("*.py"))

    def _version(self) -> tuple[int, ...]:
        text = self.text("vllm/_version.py") or ""
        found = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([0-9.]+)""", text)
        if not found:
            raise SystemExit("error: no version in vllm/_version.py")
        return tuple(int(p) for p in found.group(1).strip(".").split("."))

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if self.exists(path):
                return path
        return None


@dataclass
class Report:
    sections: list[tuple[str, list[str], list[str]]] = field(default_factory=list)  # title, ok lines, diffs

    def add(self, title: str, ok: list[str], diffs: list[str]) -> None:
        self.sections.append((title, ok, diffs))

    @property
    def differences(self) -> list[str]:
        return [d for _, _, diffs in self.sections for d in diffs]

    def render(self, source: Source) -> str:
        version = ".".join(map(str, source.version))
        lines = [f"vLLM {version} ({source.label}) against vllm-partial-kv's touch points"]
        for title, ok, diffs in self.sections:
            lines.append(f"\n{title}: {'DIFFERS' if diffs else 'ok'}")
            lines += [f"  DIFF  {d}" for d in diffs] + [f"  ok    {o}" for o in ok]
        n = len(self.differences)
        lines.append(f"\n{n} unexpected difference{'s' * (n != 1)}" if n else "\nno unexpected differences")
        return "\n".join(lines)


# -- the plugin's side, parsed from its own modules -------------------------------------------

def plugin_modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE.parent)): ast.parse(p.read_text(), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _is_vllm(module: str | None) -> bool:
    return module is not None and (module == "vllm" or module.startswith("vllm."))


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)


@dataclass(frozen=True)
class Import:
    module: str
    name: str | None  # None: `import module`
    where: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


def _imports_in(nodes: list[ast.stmt], where: str) -> list[Import]:
    found = []
    for node in (n for stmt in nodes for n in ast.walk(stmt)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and _is_vllm(node.module):
            found += [Import(node.module, a.name, f"{where}:{node.lineno}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [Import(a.name, None, f"{where}:{node.lineno}") for a in node.names if _is_vllm(a.name)]
    return found


def plugin_imports(modules: dict[str, ast.Module]) -> list[list[list[Import]]]:
    """Every vLLM import of the plugin, as groups of alternatives: one alternative for a plain import,
    one per branch for `try: import ... except ImportError: ...` (the fallback may import nothing)."""
    groups: list[list[list[Import]]] = []
    for path, tree in modules.items():
        in_try: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
                body = _imports_in(node.body, path)
                if body:
                    groups.append([body] + [_imports_in(h.body, path) for h in node.handlers])
                    in_try.update(id(n) for stmt in node.body + [s for h in node.handlers for s in h.body]
                                  for n in ast.walk(stmt))
        for node in ast.walk(tree):
            if id(node) not in in_try and isinstance(node, ast.ImportFrom | ast.Import):
                groups += [[[imp]] for imp in _imports_in([node], path)]
    return groups


def _vllm_names(tree: ast.Module) -> dict[str, tuple[str, str]]:
    """Names a plugin module binds by `from vllm... import name`: name -> (module, name)."""
    return {(a.asname or a.name): (n.module, a.name) for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.level == 0 and _is_vllm(n.module) for a in n.names}


def plugin_subclasses(modules: dict[str, ast.Module]) -> list[tuple[str, ast.ClassDef, str, str]]:
    """The plugin's classes derived from a vLLM class: (where, class, vLLM module, vLLM class).
    A base taken from compat (`compat.Name`, or imported from it) resolves through compat's imports."""
    compat = _vllm_names(modules["vllm_partial_kv/compat.py"])
    found = []
    for path, tree in modules.items():
        names = _vllm_names(tree)
        names.update({(a.asname or a.name): compat[a.name] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                      and (n.module, n.level) in (("vllm_partial_kv.compat", 0), ("compat", 1))
                      for a in n.names if a.name in compat})  # from vllm_partial_kv.compat import Name
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for base in cls.bases:
                if isinstance(base, ast.Name) and base.id in names:
                    found.append((path, cls, *names[base.id]))
                elif (isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name)
                      and base.value.id == "compat" and base.attr in compat):
                    found.append((path, cls, *compat[base.attr]))
    return found


def plugin_config_reads(modules: dict[str, ast.Module]) -> dict[tuple[str, str], str]:
    """(vLLM config class, attribute) -> first place the plugin reads it, following names bound to
    a config (`mc = vllm_config.model_config`)."""

    def kind(node: ast.expr, aliases: dict[str, str]) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id) or CONFIGS.get(node.id)
        if isinstance(node, ast.Attribute):
            return CONFIGS.get(node.attr)
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)):  # getattr(vllm_config, "model_config", None)
            return CONFIGS.get(node.args[1].value)
        return None

    reads: dict[tuple[str, str], str] = {}
    for path, tree in modules.items():
        nodes = list(ast.walk(tree))
        aliases: dict[str, str] = {}  # per module: the plugin names a config alike throughout
        for node in nodes:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                pairs = [(node.targets[0], node.value)]
                if isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs = list(zip(node.targets[0].elts, node.value.elts))
                for target, value in pairs:
                    if isinstance(target, ast.Name) and (k := kind(value, {})):
                        aliases[target.id] = k
        for node in nodes:
            if isinstance(node, ast.Attribute) and (k := kind(node.value, aliases)):
                if node.attr not in CONFIGS or CONFIGS[node.attr] == k:
                    reads.setdefault((k, node.attr), f"{path}:{node.lineno}")
    return reads


def matched_architectures(modules: dict[str, ast.Module]) -> list[str]:
    """matcher.MATCHED_ARCHITECTURES, read from its source."""
    for node in ast.walk(modules["vllm_partial_kv/matcher.py"]):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MATCHED_ARCHITECTURES"
                                                for t in node.targets):
            return sorted(c.value for c in ast.walk(node.value)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str))
    raise RuntimeError("MATCHED_ARCHITECTURES not found in matcher.py")


# -- vLLM's side ----------------------------------------------------------------------------

def _module_names(source: Source, path: str) -> tuple[set[str], bool]:
    """Names bound at a module's top level (including under if/try), and whether it has a
    module `__getattr__` (lazy names)."""
    names: set[str] = set()
    lazy = False
    stack = list(source.tree(path).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
            lazy |= node.name == "__getattr__"
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for a in node.names:
                if a.name == "*" and isinstance(node, ast.ImportFrom):
                    star = _resolve_relative(path, node)
                    if star and (file := source.module_file(star)):
                        names |= _module_names(source, file)[0]
                else:
                    names.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.If | ast.Try | ast.With):
            stack += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
            stack += [s for h in getattr(node, "handlers", []) for s in h.body]
    return names, lazy


def _resolve_relative(path: str, node: ast.ImportFrom) -> str | None:
    """The absolute module a (possibly relative) `from ... import` in file `path` names."""
    if node.level == 0:
        return node.module
    package = path.removesuffix(".py").split("/")[:-1]  # a module's package; __init__'s own
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def resolve_import(source: Source, imp: Import) -> str | None:
    """None if the import works on this release, else why not."""
    file = source.module_file(imp.module)
    if file is None:
        return f"no module {imp.module}"
    if imp.name is None or source.module_file(f"{imp.module}.{imp.name}"):
        return None
    names, lazy = _module_names(source, file)
    if imp.name in names:
        return None
    if lazy and re.search(rf"""['"]{re.escape(imp.name)}['"]""", source.text(file)):
        return None  # served by the module's __getattr__
    return f"{imp.module} has no {imp.name}"


def _find_class(source: Source, file: str, name: str, hops: int = 3) -> tuple[str, ast.ClassDef] | None:
    """A class by name in a module, following re-exports (`from .x import Name`)."""
    tree = source.tree(file)
    if tree is None:
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return file, node
    for node in tree.body if hops else ():
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            target = _resolve_relative(file, node)
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            if target and (f := source.module_file(target)):
                return _find_class(source, f, original, hops - 1)
    return None


def _methods(source: Source, file: str, cls: ast.ClassDef) -> dict[str, ast.FunctionDef]:
    """A class's methods, with those of its bases found in vLLM (base first, so overrides win)."""
    methods: dict[str, ast.FunctionDef] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and (found := _find_class(source, file, base.id)):
            methods.update(_methods(source, *found))
    methods.update({n.name: n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)})
    return methods


def _kind(fn: ast.FunctionDef) -> str:
    names = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in fn.decorator_list}
    return next((k for k in ("staticmethod", "classmethod", "property") if k in names), "method")


def _is_abstract(fn: ast.FunctionDef) -> bool:
    return any((d.id if isinstance(d, ast.Name) else getattr(d, "attr", "")) == "abstractmethod"
               for d in fn.decorator_list)


def signature_difference(ours: ast.FunctionDef, theirs: ast.FunctionDef) -> str | None:
    """Why the plugin's method cannot take every call vLLM's signature allows, or None: the same
    parameter names in the same places, nothing required that vLLM may leave out."""
    if _kind(ours) != _kind(theirs):
        return f"vLLM's is a {_kind(theirs)}, the plugin's a {_kind(ours)}"
    o, t = ours.args, theirs.args
    skip = 0 if _kind(theirs) == "staticmethod" else 1  # self / cls
    o_pos, t_pos = (o.posonlyargs + o.args)[skip:], (t.posonlyargs + t.args)[skip:]
    o_required, t_required = len(o_pos) - len(o.defaults), len(t_pos) - len(t.defaults)
    for i, arg in enumerate(t_pos):
        if i >= len(o_pos):
            if o.vararg is None:
                return f"vLLM passes {arg.arg!r}, the plugin's method does not take it"
        elif o_pos[i].arg != arg.arg:
            return f"parameter {i + 1} is {arg.arg!r} in vLLM, {o_pos[i].arg!r} in the plugin"
        elif t_required <= i < o_required:
            return f"vLLM may leave out {arg.arg!r}, which the plugin's method requires"
    for extra in o_pos[len(t_pos):o_required]:
        return f"the plugin's method requires {extra.arg!r}, which vLLM does not pass"
    taken = {a.arg for a in o_pos + o.kwonlyargs}
    for arg in t.kwonlyargs:
        if arg.arg not in taken and o.kwarg is None:
            return f"vLLM passes keyword {arg.arg!r}, the plugin's method does not take it"
    for arg, default in zip(o.kwonlyargs, o.kw_defaults):
        if default is None and arg.arg not in {a.arg for a in t_pos + t.kwonlyargs}:
            return f"the plugin's method requires keyword {arg.arg!r}, which vLLM does not pass"
    if t.vararg and not o.vararg:
        return f"vLLM's takes *{t.vararg.arg}, the plugin's does not"
    if t.kwarg and not o.kwarg:
        return f"vLLM's takes **{t.kwarg.arg}, the plugin's does not"
    return None


def _params(fn: ast.FunctionDef) -> str:
    a = fn.args
    parts = [x.arg for x in a.posonlyargs + a.args]
    parts += [f"*{a.vararg.arg}"] if a.vararg else (["*"] if a.kwonlyargs else [])
    parts += [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
    return f"{fn.name}({', '.join(parts)})"


def check_classes(source: Source, modules: dict[str, ast.Module]) -> tuple[list[str], list[str]]:
    ok, diffs = [], []
    for where, cls, module, base_name in plugin_subclasses(modules):
        file = source.module_file(module)
        found = file and _find_class(source, file, base_name)
        if not found:
            diffs.append(f"{cls.name} ({where}) derives from {module}.{base_name}, which is gone")
            continue
        theirs = _methods(source, *found)
        ours = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
        checked = []
        for name, fn in ours.items():
            if name in theirs and not (name.startswith("__") and name != "__init__"):
                if why := signature_difference(fn, theirs[name]):
                    diffs.append(f"{base_name}.{name}: {why} (vLLM: {_params(theirs[name])}; "
                                 f"plugin: {_params(fn)}, {where}:{fn.lineno})")
                else:
                    checked.append(name)
            elif base_name == CONNECTOR_BASE and source.version[:2] < CONNECTOR_HOOKS_SINCE.get(name, (0, 0)):
                ok.append(f"{base_name}.{name}: overridden for later releases; not in this one's base")
            elif base_name == CONNECTOR_BASE and not name.startswith("_"):
                diffs.append(f"{base_name}.{name}: the plugin overrides it ({where}:{fn.lineno}), "
                             f"vLLM's base has no such method")
        missing = sorted(n for n, fn in theirs.items() if _is_abstract(fn) and n not in ours)
        if missing:
            diffs.append(f"{base_name}: abstract in vLLM, not implemented by {cls.name}: {', '.join(missing)}")
        ok.append(f"{cls.name}({base_name}): {len(checked)} overrides match ({', '.join(checked) or '-'})")
    for file, cls_name, method, params in WRAPPED:
        found = source.exists(file) and _find_class(source, file, cls_name)
        fn = found and _methods(source, *found).get(method)
        if not fn:
            diffs.append(f"{cls_name}.{method} ({file}), which the plugin wraps, is gone")
        elif tuple(a.arg for a in fn.args.posonlyargs + fn.args.args) != params:
            diffs.append(f"{cls_name}.{method}: vLLM's is {_params(fn)}, the plugin's wrapper takes {params}")
        else:
            ok.append(f"{cls_name}.{method} (wrapped) takes {params}")
    return ok, diffs


def check_imports(source: Source, modules: dict[str, ast.Module]) -> tuple[list[str], list[str]]:
    ok, diffs = [], []
    for group in plugin_imports(modules):
        whys = [[w for imp in alt if (w := resolve_import(source, imp))] for alt in group]
        first = ", ".join(sorted({str(i) for i in group[0]}))
        if not whys[0]:
            ok.append(first)
        elif any(not w for w in whys[1:]):
            ok.append(f"{first}: not here ({'; '.join(sorted(set(whys[0])))}); its fallback is used")
        else:
            diffs.append(f"{'; '.join(whys[0])} (imported at {group[0][0].where})")
    return sorted(set(ok)), sorted(set(diffs))


def registry_table(source: Source) -> dict[str, tuple[str, str]]:
    """vLLM's architecture -> (module, class) as its registry merges the tables into _VLLM_MODELS."""
    tree = source.tree("vllm/model_executor/models/registry.py")
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    order: list[str] = []
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if not isinstance(target, ast.Name) or not isinstance(node.value, ast.Dict):
            continue
        if target.id == "_VLLM_MODELS":
            order = [v.id for k, v in zip(node.value.keys, node.value.values) if k is None and isinstance(v, ast.Name)]
            continue
        entries = {}
        for k, v in zip(node.value.keys, node.value.values):
            if isinstance(k, ast.Constant) and isinstance(v, ast.Tuple) and len(v.elts) == 2 and all(
                    isinstance(e, ast.Constant) for e in v.elts):
                entries[k.value] = (v.elts[0].value, v.elts[1].value)
        if entries:
            tables[target.id] = entries
    merged: dict[str, tuple[str, str]] = {}
    for name in order or list(tables):
        merged.update(tables.get(name, {}))
    return merged


def check_registry(source: Source, modules: dict[str, ast.Module]) -> tuple[list[str], list[str]]:
    ok, diffs = [], []
    table = registry_table(source)
    minor = source.version[:2]
    for arch in matched_architectures(modules):
        last_own, first_backend = TRANSFORMERS_BACKEND.get(arch, (None, None))
        allowed = {"own"} if first_backend is None else (
            {"transformers"} if minor >= first_backend else {"own"} if minor <= last_own else {"own", "transformers"})
        if arch not in table:
            diffs.append(f"{arch}: not in vLLM's model registry")
            continue
        module, cls = table[arch]
        if module == "transformers":
            served = "transformers"
        else:
            name = module if module.startswith("vllm.") else f"vllm.model_executor.models.{module}"
            file = source.module_file(name)
            if not file or not _find_class(source, file, cls):
                diffs.append(f"{arch}: the registry names {name}.{cls}, which does not exist")
                continue
            served = "own"
        text = f"vLLM's own {module}.{cls}" if served == "own" else "the Transformers backend (plugin: plain K/V)"
        (ok if served in allowed else diffs).append(
            f"{arch}: {text}" + ("" if served in allowed else
                                 f"; the plugin expects {' or '.join(sorted(allowed))} on {minor[0]}.{minor[1]}"))
    return ok, diffs


def _class_attributes(source: Source, name: str) -> set[str] | None:
    """Everything a vLLM config class defines: fields, methods, properties, `self.x =` in methods."""
    for file in source.listdir("vllm/config"):
        found = _find_class(source, file, name, hops=0)
        if found:
            _, cls = found
            attrs = set(_methods(source, *found))
            for node in ast.walk(cls):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    attrs.add(node.target.id)
                elif isinstance(node, ast.Assign):
                    attrs.update(t.id for t in node.targets if isinstance(t, ast.Name))
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                        and isinstance(node.ctx, ast.Store):
                    attrs.add(node.attr)
            return attrs
    return None


def check_config_fields(source: Source, modules: dict[str, ast.Module]) -> tuple[list[str], list[str]]:
    ok, diffs = [], []
    classes: dict[str, set[str] | None] = {}
    for (cls, attr), where in sorted(plugin_config_reads(modules).items()):
        if (cls, attr) in VERSIONED_FIELDS:
            continue
        if cls not in classes:
            classes[cls] = _class_attributes(source, cls)
        if classes[cls] is None:
            diffs.append(f"{cls}: no such class in vllm/config/")
        elif attr in classes[cls]:
            ok.append(f"{cls}.{attr}")
        else:
            diffs.append(f"{cls}.{attr}: not in vLLM's {cls} (read at {where})")
    return ok, sorted(set(diffs))


def check_compile_key(source: Source) -> tuple[list[str], list[str]]:
    found = _find_class(source, "vllm/config/vllm.py", "VllmConfig", hops=0)
    methods = _methods(source, *found) if found else {}
    for name in ("compile_factors", "compute_hash"):
        if name in methods:
            covers = "additional_config" in ast.unparse(methods[name])
            line = f"VllmConfig.{name} {'covers' if covers else 'does not cover'} additional_config"
            return ([line], []) if covers else ([], [line + " (compat.add_to_compile_key relies on it)"])
    return [], ["VllmConfig has neither compile_factors nor compute_hash (compat.compile_key)"]


# -- the patch ------------------------------------------------------------------------------

def patch_for(version: tuple[int, ...]) -> Path | None:
    path = PATCHES / f"vllm-{version[0]}.{version[1]}.patch"
    return path if path.exists() else None


def patch_targets(patch: Path) -> list[str]:
    return re.findall(r"^\+\+\+ b/(\S+)", patch.read_text(), re.M)


def dry_run(patch: Path, files: dict[str, str]) -> tuple[bool, str]:
    """`patch --dry-run -F0` of `patch` on `files` (path -> text): (applies without fuzz,
    patch's output). Offsets show in the output as "offset"."""
    with tempfile.TemporaryDirectory() as tmp:
        for path, text in files.items():
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / path).write_text(text)
        proc = subprocess.run(["patch", "-p1", "--dry-run", "-F0", "-d", tmp, "-i", str(patch)],
                              capture_output=True, text=True)
    return proc.returncode == 0 and "fuzz" not in proc.stdout, proc.stdout + proc.stderr


def check_patch(source: Source) -> tuple[list[str], list[str]]:
    if not PATCHES.is_dir():
        return ["patches/ not here (installed package): not checked"], []
    if shutil.which("patch") is None:
        return ["the patch tool is missing: not checked"], []
    minor = f"{source.version[0]}.{source.version[1]}"
    own = patch_for(source.version)
    out = ""
    for patch in [own] if own else sorted(PATCHES.glob("vllm-*.patch"), reverse=True):
        files = {t: source.text(t) for t in patch_targets(patch)}
        if None in files.values():
            return [], [f"{patch.name}: vLLM {minor} lacks {[t for t, v in files.items() if v is None]}"]
        applies, out = dry_run(patch, files)
        if applies and own:
            if "offset" in out:
                return [], [f"{patch.name} applies to {minor} only at an offset: remake it"]
            return [f"{patch.name} applies without fuzz or offset"], []
        if applies:
            return [f"no vllm-{minor}.patch; {patch.name} applies without fuzz (patches/apply.sh uses it)"], []
    return [], [f"no patch in patches/ applies to vLLM {minor} without fuzz"
                + (f": {out.strip().splitlines()[-1]}" if own else "")]


# -- running it ------------------------------------------------------------------------------

def check(location: Path) -> tuple[Report, Source]:
    source = Source(location)
    modules = plugin_modules()
    report = Report()
    report.add("Connector base and other vLLM classes", *check_classes(source, modules))
    report.add("Imports from vLLM", *check_imports(source, modules))
    report.add("Architectures the matcher knows (vLLM's model registry)", *check_registry(source, modules))
    report.add("Config fields the plugin reads", *check_config_fields(source, modules))
    report.add("Compile key", *check_compile_key(source))
    report.add("Patch (--kv-offload partial-recompute)", *check_patch(source))
    return report, source


def wheel_cache() -> Path:
    return Path(os.environ.get(WHEEL_CACHE_ENV) or Path.home() / ".cache" / "vllm_partial_kv" / "wheels")


def _wheel_version(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"vllm-([0-9.]+?)(?:-|\.?[a-z])", path.name).group(1).split("."))


def fetch_wheel(version: str) -> Path:
    """vLLM's wheel from PyPI (`version` exact, or "latest"), downloaded once into wheel_cache()."""
    cache = wheel_cache()
    if version != "latest":
        cached = sorted(cache.glob(f"vllm-{version}-*.whl"))
        if cached:
            return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    spec = "vllm" if version == "latest" else f"vllm=={version}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "--quiet", spec, "-d", str(cache)], check=True)
    wheels = sorted(cache.glob("vllm-*.whl"), key=_wheel_version)
    if version != "latest":
        wheels = [w for w in wheels if w.name.startswith(f"vllm-{version}-")]
    return wheels[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_partial_kv.touchpoints", description=__doc__.split("\n")[0])
    parser.add_argument("location", nargs="?", type=Path, help="a vLLM wheel, or a directory holding vllm/")
    parser.add_argument("--download", metavar="VERSION", help="check this release from PyPI (or `latest`)")
    args = parser.parse_args(argv)
    if (args.location is None) == (args.download is None):
        parser.error("give a wheel or directory, or --download VERSION")
    report, source = check(args.location or fetch_wheel(args.download))
    print(report.render(source))
    return 1 if report.differences else 0


if __name__ == "__main__":
    sys.exit(main())
