"""Command-line helpers shared by every script: one-line errors, checked number types, flags given.

Every tool here (ddpm.py, sample.py, evaluate.py, bench.py, ablations.py) parses its flags with
this ArgumentParser, so a bad value is one line on stderr and exit status 2, never a traceback.
"""
import argparse
import copy
import math


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """-h shows each flag's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"formatter_class": HelpFormatter, **kwargs})

    def error(self, message):  # one line, exit status 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


def number(kind, low=None, low_inclusive=False, high=None, high_inclusive=False, what=""):
    """An argparse type: int or float within (low, high), bounds included where said."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what or kind.__name__}, got {text!r}")
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = number(int, 0, what="a positive integer")
nonnegative_int = number(int, 0, low_inclusive=True, what="a non-negative integer")
positive_float = number(float, 0, what="a positive number")
nonnegative_float = number(float, 0, low_inclusive=True, what="a number >= 0")
unit_interval = number(float, 0, high=1, what="a number in (0, 1)")
closed_unit_interval = number(float, 0, True, 1, True, what="a number in [0, 1]")
ema_range = number(float, 0, low_inclusive=True, high=1, what="in [0, 1)")


def sampler_error(objective, sampler, samplers):
    """Why --objective OBJECTIVE can't sample with --sampler SAMPLER, in one line; None if it can."""
    if sampler not in samplers:
        return f"--sampler {sampler} is not one of --objective {objective}'s: {', '.join(samplers)}"
    return None


def flags_given(parser, argv):
    """The destinations of the flags that argv itself sets (not the parser's defaults)."""
    spy = copy.deepcopy(parser)
    for action in spy._actions:
        action.default = argparse.SUPPRESS
    return set(vars(spy.parse_args(argv)))


def as_argv(flags):
    """{"num_epochs": 200, "quiet": True, "beta_end": None} -> ["--num_epochs", "200", "--quiet"];
    None and False leave a flag to its default."""
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not None and value is not False:
            argv += [f"--{key}", str(value)]
    return argv
