"""Arguments shared by every command (mount, recover, status): the argparse flavour, --NAME
options made from options.py's table, -o lists, and BUCKET[:PREFIX]. A module of its own so
that the subcommands need not import cli.py (which imports them)."""

from __future__ import annotations

import argparse
import importlib.metadata

from . import __version__
from .errors import QuietError
from .options import OPTIONS, is_generic

USAGE_ERROR = 2
# the names of S3 Express One Zone directory buckets end so (name--usw2-az1--x-s3); general
# purpose buckets may not (docs/SEMANTICS.md "Buckets and regions")
EXPRESS_SUFFIX = "--x-s3"


def _split_options(values: list[str]) -> list[tuple[str, str | None]]:
    pairs = []
    for value in values:
        for item in value.split(","):
            if item:
                name, sep, arg = item.partition("=")
                name = name.strip()
                if not name.startswith(("x-", "_")):
                    name = name.replace("-", "_")
                pairs.append((name, arg if sep else None))
    return pairs


def package_version() -> str:
    """The installed distribution's version; the source tree's when not installed."""
    try:
        return importlib.metadata.version("s3fs-stream")
    except importlib.metadata.PackageNotFoundError:
        return __version__


class Parser(argparse.ArgumentParser):
    """argparse with --version, and usage errors as one line with exit code 2."""

    def __init__(self, prog: str, description: str, **kwargs):
        super().__init__(prog=prog, description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.add_argument("--version", action="version",
                          version=f"%(prog)s {package_version()}",
                          help="print the version and exit")

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


SECTION_TITLES = {"store": "S3 options", "fs": "file system options",
                  "mount": "mount and log options"}


def add_options(parser: argparse.ArgumentParser, sections: dict[str, str]) -> None:
    """--NAME VALUE for every option of the given sections (section -> group title)."""
    groups = {section: parser.add_argument_group(title) for section, title in sections.items()}
    for name, option in OPTIONS.items():
        if option.section in groups:
            extra = {"nargs": "?", "const": "yes"} if option.flag else {}
            groups[option.section].add_argument(
                "--" + name.replace("_", "-"), dest="long_" + name, metavar=option.metavar,
                help=option.help, **extra)


def parse_options(args: argparse.Namespace, sections: set[str],
                  sloppy: bool = False) -> dict[str, dict]:
    """The -o and --NAME options of `args` as {section: {field: value}}; options of other
    sections are unknown here (a mount option given to recover is a usage error)."""
    pairs = _split_options(args.options)
    pairs += [(name, value) for name in OPTIONS
              if (value := getattr(args, "long_" + name, None)) is not None]
    values: dict[str, dict] = {section: {} for section in sections}
    unknown = []
    for name, value in pairs:
        if name in OPTIONS and OPTIONS[name].section in sections:
            option = OPTIONS[name]
            values[option.section][option.field] = _parse_value(name, value)
        elif not is_generic(name):
            unknown.append(name)
    if unknown and not sloppy:
        valid = sorted(name for name, option in OPTIONS.items() if option.section in sections)
        raise QuietError(f"unknown option(s): {', '.join(unknown)}; valid options: "
                         f"{', '.join(valid)}", USAGE_ERROR)
    return values


def parse_source(source: str) -> tuple[str, str]:
    """BUCKET[:PREFIX] -> (bucket, "" or "prefix/")."""
    bucket, _, prefix = source.partition(":")
    if not bucket or "/" in bucket:
        raise QuietError(f"{source!r} is not BUCKET or BUCKET:PREFIX (e.g. "
                         "my-bucket:some/prefix)", USAGE_ERROR)
    if bucket.endswith(EXPRESS_SUFFIX):
        raise QuietError(f"{bucket} is an S3 Express One Zone directory bucket, which "
                         "s3stream does not support (unsorted listings, session-based "
                         "auth); use a general purpose bucket", USAGE_ERROR)
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


def _parse_value(name: str, value: str | None):
    option = OPTIONS[name]
    if not value and not option.flag:
        raise QuietError(f"option {name} needs a value: -o {name}={option.metavar}",
                         USAGE_ERROR)
    try:
        return option.parse("yes" if value is None else value)
    except ValueError as exc:
        raise QuietError(f"option {name}: {exc}", USAGE_ERROR) from None
