"""The one command-line convention of every ``flagm3`` subcommand, in one place.

Every parser built on :class:`ConventionParser` (``flagm3`` and its subcommands) or mixing in
:class:`ConventionMixin` (``flagm3 train``'s ``HfArgumentParser``) gets, for every option it has or is given
later:

- both spellings: ``--batch-size`` and ``--batch_size`` are the same option (whichever the parser defines);
- old names kept as aliases (:meth:`ConventionMixin.add_alias`), accepted but not listed by ``--help``;
- an unknown option ends in one line naming the closest known one (``did you mean --batch-size?``) and exit
  code 2, as every other argparse usage error here;
- ``--help`` shows each option's default (unless it has none: ``None``, a switched-off flag);
- no abbreviations: ``--batch`` is not ``--batch-size`` (a prefix would silently change meaning when an option
  is added).

No torch or transformers import here: ``flagm3 --help`` must stay fast.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, Iterable, Optional, Sequence


def other_spelling(option: str) -> str:
    """``--a_b`` <-> ``--a-b`` (the leading dashes kept)."""
    body = option[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


def _same(option: str) -> str:
    return option.replace("_", "-")


def closest_option(option: str, known: Iterable[str]) -> Optional[str]:
    """The known option closest to ``option`` (separators ignored), or ``None`` when none is close."""
    known = sorted(set(known))
    by_key = {_same(k): k for k in reversed(known)}  # the first spelling in sorted order wins
    match = difflib.get_close_matches(_same(option), list(by_key), n=1, cutoff=0.6)
    return by_key[match[0]] if match else None


class ConventionFormatter(argparse.HelpFormatter):
    """Help text with the default appended, ``(default: 64)``, unless the help shows it already or there is none
    to show (``None``, an off switch, a suppressed default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is argparse.SUPPRESS or action.nargs == 0
                or default is False or (isinstance(default, (list, tuple)) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class ConventionMixin:
    """The convention (see the module) for any ``argparse.ArgumentParser`` subclass; put it first in the bases."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", ConventionFormatter)
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ names
    @property
    def option_aliases(self) -> dict[str, str]:
        """``{old option: option it means}`` of this parser (both spellings of each old name)."""
        if "_option_aliases" not in self.__dict__:
            self.__dict__["_option_aliases"] = {}
        return self.__dict__["_option_aliases"]

    def add_alias(self, old: str, new: str) -> None:
        """Accept ``old`` (either spelling) as ``new``, an option of this parser; ``--help`` lists only ``new``."""
        target = self.resolve_option(new)
        if target is None:
            raise ValueError(f"{self.prog}: alias {old} for unknown option {new}")
        self.option_aliases[old] = self.option_aliases[other_spelling(old)] = target

    def resolve_option(self, option: str) -> Optional[str]:
        """The option string this parser knows ``option`` (``--name`` without ``=value``) as, or ``None``."""
        known = self._option_string_actions  # type: ignore[attr-defined]
        if option in known:
            return option
        if not option.startswith("--"):
            return None
        if other_spelling(option) in known:
            return other_spelling(option)
        return self.option_aliases.get(option)

    def accepts(self, option: str) -> bool:
        """Whether ``option`` (any spelling, or an alias) is an option of this parser."""
        return self.resolve_option(option.split("=", 1)[0]) is not None

    def known_options(self) -> list[str]:
        return sorted({o for o in self._option_string_actions if o.startswith("--")} | set(self.option_aliases))  # type: ignore[attr-defined]

    def normalize_args(self, args: Sequence[str]) -> list[str]:
        """``args`` with every other spelling or alias of this parser's options replaced by its own spelling."""
        out = []
        for i, token in enumerate(args):
            if token == "--":  # everything after is a value
                return out + list(args[i:])
            if token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                resolved = self.resolve_option(name)
                if resolved is not None and resolved != name:
                    token = resolved + eq + value
            out.append(token)
        return out

    # ----------------------------------------------------------------------------------------- errors
    def unknown(self, option: str) -> None:
        """Exit 2 with one line naming ``option`` and the closest known option."""
        option = option.split("=", 1)[0]
        close = closest_option(option, self.known_options())
        hint = f"; did you mean {close}?" if close else f"; see `{self.prog} --help`"
        self.error(f"unknown option {option}{hint}")

    def error(self, message: str):  # type: ignore[override]
        """One line, exit code 2. A missing required option of a command line that also has an unknown option
        reports the unknown one (the likely typo of the missing one)."""
        if "required" in message and not self._subparsers_action():
            unknown = [t for t in getattr(self, "_flagm3_args", ()) if t.startswith("--") and not self.accepts(t)]
            if unknown:
                self.__dict__["_flagm3_args"] = ()
                self.unknown(unknown[0])
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")  # type: ignore[attr-defined]

    # ---------------------------------------------------------------------------------------- parsing
    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):  # type: ignore[override]
        args = self.normalize_args(sys.argv[1:] if args is None else list(args))
        self.__dict__["_flagm3_args"] = args
        return super().parse_known_args(args, namespace)  # type: ignore[misc]

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self.chosen_parser(namespace)
            options = [e for e in extras if e.startswith("-")]
            if options:
                parser.unknown(options[0])
            parser.error(f"unexpected value {extras[0]!r} (values go after their --option)")
        return namespace

    def _subparsers_action(self) -> Optional[argparse._SubParsersAction]:
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)  # type: ignore[attr-defined]

    def chosen_parser(self, namespace: Any) -> ConventionMixin:
        """The (sub)parser that parsed the rest of the command line: the deepest subcommand chosen."""
        action = self._subparsers_action()
        chosen = action.choices.get(getattr(namespace, action.dest, None) or "") if action else None
        return chosen.chosen_parser(namespace) if isinstance(chosen, ConventionMixin) else self


class ConventionParser(ConventionMixin, argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` with flagm3's command-line convention (its subparsers get it too)."""


def build_convention_parser(**kwargs: Any) -> ConventionParser:
    """A parser with the convention: the factory every flagm3 command line starts from."""
    return ConventionParser(**kwargs)
