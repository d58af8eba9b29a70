"""Method options on the command line: every registered method's config fields become ``--field-name`` options.

``secateurs prune --help`` shows one group per method with that method's own options; an option that several
methods take (``--batch-size``: blockpruner, sleb and shortgpt default to 1, flap, wanda-sp and self-pruner to 4)
is listed once, under "options shared by several methods", with every method's default. ``secateurs prune
--method NAME --help`` shows only NAME's options, each with NAME's default.

Every method option's argparse default is None, so that ``selected`` can tell what the user gave from what the
method's config fills in; an option of another method is refused by ``selected``.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ..errors import UserError


@dataclasses.dataclass
class CliOption:
    """One ``--name`` option and, for each method that takes it, its field (help, default, choices)."""

    name: str  # the config field's name (``batch_size``); the flag is ``--batch-size``
    type: type
    fields: dict  # method name -> dataclasses.Field

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_text(self, methods=None) -> str:
        defaults = {m: f.default for m, f in self.fields.items() if methods is None or m in methods}
        if len(set(map(repr, defaults.values()))) == 1:
            v = next(iter(defaults.values()))
            if v is None and len(defaults) == 1:
                return ""  # not set unless given (the help says what happens then)
            who = f"{', '.join(defaults)}; " if methods is None and len(defaults) > 1 else ""
            return f"({who}default {v})"
        return "(default: " + ", ".join(f"{m} {v}" for m, v in defaults.items()) + ")"

    def add_to(self, group, method: str | None = None) -> None:
        f = self.fields[method] if method else next(iter(self.fields.values()))
        help_text = " ".join(x for x in (f.metadata.get("help", ""), self.default_text([method] if method else None)) if x)
        kw = {"default": None, "dest": self.name, "help": help_text}
        if self.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = self.type
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(self.flag, *f.metadata.get("aliases", ()), **kw)  # aliases: other accepted spellings


def _field_type(config_cls, name: str) -> type:
    typ = typing.get_type_hints(config_cls)[name]
    if typ is bool:
        return bool
    base = [t for t in typing.get_args(typ) if t is not type(None)] or [typ]
    return base[0] if base[0] in (int, float, str) else str


def method_options() -> dict[str, CliOption]:
    """Every method option by field name, in registry order (methods sorted by name, fields in order)."""
    from ..methods import all_methods

    options: dict[str, CliOption] = {}
    for name, m in all_methods().items():
        for f in dataclasses.fields(m.config_cls):
            typ = _field_type(m.config_cls, f.name)
            opt = options.setdefault(f.name, CliOption(f.name, typ, {}))
            if opt.type is not typ:
                raise TypeError(f"option --{f.name} has type {opt.type.__name__} in one method, {typ.__name__} in {name}")
            opt.fields[name] = f
    return options


def add_method_options(parser: argparse.ArgumentParser, method: str | None = None) -> None:
    """The method groups of ``prune``'s parser: all methods (``method=None``), or only ``method``'s options."""
    from ..methods import all_methods, get_method

    options = method_options()
    if method is not None:
        spec = get_method(method)
        group = parser.add_argument_group(f"options of {method}", f"{spec.summary}. --ratio R: {spec.ratio_rule.describe()}")
        mine = [o for o in options.values() if method in o.fields]
        for o in mine:
            o.add_to(group, method)
        if not mine:
            group.description += ". It has no options of its own."
        return
    shared = [o for o in options.values() if len(o.fields) > 1]
    if shared:
        group = parser.add_argument_group("options shared by several methods",
                                          "each method uses its own default, listed by method")
        for o in shared:
            o.add_to(group)
    for name, spec in all_methods().items():
        own = [o for o in options.values() if list(o.fields) == [name]]
        also = [o.flag for o in shared if name in o.fields]
        desc = spec.summary + (f". Also takes {', '.join(also)} (shared, above)" if also else "")
        if not own:
            desc += ". No options of its own" if also else ". It has no options"
        group = parser.add_argument_group(f"options of {name}", desc)
        for o in own:
            o.add_to(group, name)


def selected(args: argparse.Namespace, method: str) -> dict:
    """The method options given on the command line, as config fields; a UserError for another method's."""
    options = method_options()
    given = {k: getattr(args, k) for k in options if getattr(args, k, None) is not None}
    foreign = [options[k].flag for k in given if method not in options[k].fields]
    if foreign:
        raise UserError(f"option(s) {', '.join(foreign)} do not apply to method {method}; "
                        f"`secateurs prune --method {method} --help` lists its options")
    return given


class MethodHelp(argparse.Action):
    """``--help``: after ``--method NAME``, only NAME's options (``build(parser, method)`` fills a fresh parser);
    otherwise the whole grouped help."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None, build=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)
        self.build = build

    def __call__(self, parser, namespace, values, option_string=None):
        from ..methods import all_methods

        method = getattr(namespace, "method", None)
        if method is None:
            parser.print_help()
        elif method not in all_methods():
            parser.exit(2, f"secateurs: error: unknown method {method!r}; available: {', '.join(all_methods())}\n")
        else:
            one = argparse.ArgumentParser(prog=parser.prog, add_help=False, description=parser.description,
                                          usage=(parser.usage or "").replace("NAME", method, 1) or None)
            self.build(one, method)
            one.print_help()
        parser.exit()
