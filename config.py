"""
Settings from the command line: `--key=value`, read against a table of defaults.

The table (train.py's CONFIG) maps each setting to (default, help). A default's type is its
setting's type: `--beta=0.5` is a float, `--online=true` a bool. A malformed argument, an unknown
key or a value of the wrong type stops with one line that names it; `--help` prints the table.
"""
import sys


def parse(argv, table, doc=""):
    """-> (settings {key: value}, the keys given on the command line)."""
    cfg, given = {k: v for k, (v, _) in table.items()}, set()
    if "--help" in argv or "-h" in argv:
        print(doc)
        for k, (v, h) in table.items():
            print(f"  --{k}={v!r:<14} {h}")
        sys.exit(0)
    for arg in argv:
        key, eq, val = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            sys.exit(f"bad argument {arg!r}: use --key=value (see --help)")
        if key not in cfg:
            sys.exit(f"unknown setting {key!r}; valid settings: {', '.join(table)}")
        cfg[key], given = convert(key, val, type(cfg[key])), given | {key}
    return cfg, given


def convert(key, val, kind):
    """A command-line string as the setting's type, or exit naming the setting."""
    try:
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return val.lower() in ("true", "1")
        return kind(val)
    except ValueError:
        sys.exit(f"bad value for --{key}: {val!r} is not a {kind.__name__}")


def check(cfg, rules):
    """Stop at the first rule (key, holds, what it must be) that does not hold, naming the setting."""
    for key, ok, want in rules:
        if not ok:
            sys.exit(f"bad value for --{key}: {cfg[key]!r} (must be {want})")
