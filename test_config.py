"""
Tests of config.py and train.py's settings: the form of an argument, unknown keys, types and ranges,
the checks shared with dpo.py, and --help.
"""
import re

import pytest

import train


@pytest.mark.parametrize("arg, message", [
    ("--beta", "use --key=value"),
    ("--betta=0.1", "unknown setting 'betta'; valid settings: data, tokenizer"),
    ("--beta=abc", "bad value for --beta: 'abc' is not a float"),
    ("--beta=0", "bad setting: beta must be a number > 0, got 0.0"),
    ("--online=maybe", "bad value for --online"),
    ("--loss_type=kto", "bad setting: unknown loss_type 'kto'"),
    ("--optimizer=sgd", "bad value for --optimizer"),
    ("--judge=nocolon", "bad value for --judge"),
    ("--alpha=-0.1", "bad value for --alpha: -0.1 (must be >= 0)"),
    ("--best_of=0", "bad value for --best_of: 0 (must be > 0)"),
    ("--reward_model=rm.pt", "bad value for --reward_model: 'rm.pt' (must be empty unless --method=ppo, grpo, rloo or best_of_n)"),
])
def test_bad_config_values(arg, message):
    """Each bad command line stops before any work with one line naming the setting: the form, an
    unknown key, a wrong type, a value out of range (the loss's own checks, shared with dpo.py)."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.parse_config([arg])


def test_help_lists_every_setting(capsys):
    """--help prints every setting of CONFIG (each with its default and help line) and exits."""
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    shown = capsys.readouterr().out
    assert all(f"--{k}=" in shown for k in train.CONFIG)


def test_method_defaults_yield_to_the_command_line():
    """GRPO and RLOO take their own defaults for ppo_lr (1e-4) and kl_coef (0.7), PPO keeps the table's
    (2e-4, 0.5), and a value given on the command line wins over either."""
    grpo, rloo, ppo = (train.parse_config([f"--method={m}"]) for m in ("grpo", "rloo", "ppo"))
    assert (grpo.ppo_lr, grpo.kl_coef) == (rloo.ppo_lr, rloo.kl_coef) == (1e-4, 0.7)
    assert (ppo.ppo_lr, ppo.kl_coef) == (2e-4, 0.5)
    given = train.parse_config(["--method=grpo", "--kl_coef=0.5", "--ppo_lr=3e-4"])
    assert (given.ppo_lr, given.kl_coef) == (3e-4, 0.5)
