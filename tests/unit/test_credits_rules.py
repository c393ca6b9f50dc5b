"""Credits rules that need no server: settings, and the names refusals are remembered under."""

import pytest

from services.credits import domain
from services.credits.config import Config
from services.credits.handlers import ERRORS
from shared.config import ConfigError

BASE_ENV = {"AUTH_TOKENS": "image:t"}


def test_charge_rate_limit_defaults_are_generous():
    config = Config.from_env(BASE_ENV)

    assert (config.charge_rate_per_second, config.charge_burst) == (20.0, 200)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHARGE_RATE_PER_SECOND", "0"),
        ("CHARGE_RATE_PER_SECOND", "-3"),
        ("CHARGE_RATE_PER_SECOND", "fast"),
        ("CHARGE_RATE_PER_SECOND", "inf"),
        ("CHARGE_BURST", "0"),
        ("CHARGE_BURST", "1.5"),
    ],
)
def test_a_bad_rate_limit_setting_stops_start_up_naming_it(variable, value):
    with pytest.raises(ConfigError) as raised:
        Config.from_env({**BASE_ENV, variable: value})

    assert str(raised.value).startswith(f"{variable}: ")


def test_remembered_refusals_are_stored_under_their_error_info_reason():
    # A replay rebuilds the refusal from the stored outcome, so both names must stay one.
    for outcome in domain.REMEMBERED_OUTCOMES:
        error_class = next(cls for cls in domain.RememberedRefusal.__subclasses__() if cls.outcome == outcome)
        assert ERRORS.entry_for(error_class.__new__(error_class))[1] == outcome


def test_no_amount_or_balance_can_reach_int64():
    int64_max = 2**63 - 1

    assert domain.MAX_BALANCE + domain.MAX_AMOUNT < int64_max
    assert 2 * domain.MAX_STORAGE_BYTES < int64_max
