"""Worker conditions: parsing --condition flags, probing this machine, matching profiles."""

from __future__ import annotations

import pytest

import bgqueue as bg
from bgqueue.model import conditions
from bgqueue.model.requests import PROFILE_COUNT


def test_probe_reports_every_key_with_a_valid_value() -> None:
    """Whatever this machine has, the probe reports each key, with a value check() accepts."""
    found = conditions.probe()
    assert set(conditions.SAFE_DEFAULTS) <= set(found)
    for key, value in found.items():
        assert conditions.check(key, value) == value


def test_overrides_win_over_the_probe() -> None:
    """--condition values replace probed ones; the rest stay probed."""
    found = conditions.current({"external_power": "false", "network": "none"})
    assert found["external_power"] == "false" and found["network"] == "none"
    assert found["storage"] == conditions.probe()["storage"]


def test_parse_overrides_normalises_values() -> None:
    """KEY=VALUE pairs are trimmed and lower-cased; battery levels become plain integers."""
    parsed = conditions.parse_overrides(["network=WiFi", " battery_level = 07", "idle=true"])
    assert parsed == {"network": "wifi", "battery_level": "7", "idle": "true"}


@pytest.mark.parametrize(
    "pair",
    [
        "network",
        "network=cable",
        "power=true",
        "battery_level=101",
        "battery_level=-1",
        "data_protection=strong",
        "external_power=yes",
        "=true",
    ],
)
def test_bad_overrides_are_parameter_errors(pair: str) -> None:
    """Unknown keys, unknown values and malformed pairs are refused with code 401."""
    with pytest.raises(bg.ParameterError) as caught:
        conditions.parse_overrides([pair])
    assert caught.value.code == 401


def profile(network: bool = False, power: bool = False, level: int = 0) -> int:
    """The profile number of a request with these requirements (see BGTaskRequest.profile)."""
    return int(network) | int(power) << 1 | level << 2


def test_satisfies_matches_each_requirement() -> None:
    """Network needs anything but none, power needs external power, protection is ordered."""
    offline = {"network": "none", "external_power": "true", "data_protection": "complete"}
    battery = {"network": "wifi", "external_power": "false", "data_protection": "complete"}
    locked = {
        "network": "any",
        "external_power": "true",
        "data_protection": "complete_until_first_user_authentication",
    }
    assert not conditions.satisfies(offline, profile(network=True))
    assert conditions.satisfies(offline, profile(power=True, level=3))
    assert not conditions.satisfies(battery, profile(power=True))
    assert conditions.satisfies(battery, profile(network=True, level=3))
    assert conditions.satisfies(locked, profile(level=1))
    assert not conditions.satisfies(locked, profile(level=2))


def test_profiles_lists_exactly_the_satisfied_ones() -> None:
    """A fully capable worker serves all 16 profiles; each missing capability halves them."""
    full = {"network": "ethernet", "external_power": "true", "data_protection": "complete"}
    assert conditions.profiles(full) == list(range(PROFILE_COUNT))
    offline_battery = {**full, "network": "none", "external_power": "false"}
    assert conditions.profiles(offline_battery) == [p for p in range(PROFILE_COUNT) if p & 3 == 0]
    weakest = {**full, "data_protection": "none"}
    assert conditions.profiles(weakest) == [0, 1, 2, 3]


def test_request_profiles_match_their_flags() -> None:
    """Each request's profile encodes its flags and protection level as the matcher reads them."""
    request = bg.HealthResearchTaskRequest(
        "x.study",
        requires_network_connectivity=True,
        protection_type_of_required_data=bg.FileProtectionType.COMPLETE_UNLESS_OPEN,
    )
    assert request.profile == profile(network=True, level=2)
    assert bg.ProcessingTaskRequest("x.p", requires_external_power=True).profile == profile(
        power=True
    )
