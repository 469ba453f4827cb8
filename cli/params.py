"""Option types the commands share, where click's own let a bad number through."""

from __future__ import annotations

import math
from typing import Any

import click

from nkv.compat import check_gamma
from nkv.errors import NKVError


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses NaN and infinity: every comparison with NaN is
    false, so FloatRange(0, 1) accepts it, and FloatRange(0) accepts inf."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def gamma_callback(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    """--gamma through the one range check every entry point uses (`nkv.compat.check_gamma`)."""
    if value is None:
        return None
    try:
        return check_gamma(value, "--gamma")
    except NKVError as exc:
        raise click.BadParameter(str(exc)) from None


__all__ = ["FiniteFloatRange", "gamma_callback"]
