"""How ``IMGQ_CALLBACK_HOSTS`` entries are read: spacing, case, a trailing dot, blank entries,
bracketed IPv6, networks with host bits, and the exact refusal of a bad entry. The API and CLI
tests read the setting too, but seconds later (mutation testing runs the fastest tests only)."""

from __future__ import annotations

import ipaddress

import pytest

from imgq.callbacks import CallbackRefused, HostPolicy


def test_names_are_stripped_lower_cased_and_lose_a_trailing_dot():
    policy = HostPolicy.parse([" Hooks.Example.BOX. ", "*.Mail.Example.COM."])
    assert policy.names == frozenset({"hooks.example.box"})
    assert policy.suffixes == (".mail.example.com",)


def test_blank_entries_are_skipped_not_the_end_of_the_list():
    policy = HostPolicy.parse(["", "  ", "a.example.com", "", "b.example.com"])
    assert policy.names == frozenset({"a.example.com", "b.example.com"})


def test_bracketed_ipv6_entries_are_networks_of_one_address():
    policy = HostPolicy.parse(["[::1]", "[FE80::1]", "10.1.2.3/8"])
    assert policy.networks == (ipaddress.ip_network("::1/128"), ipaddress.ip_network("fe80::1/128"),
                               ipaddress.ip_network("10.0.0.0/8"))
    assert policy.names == frozenset() and policy.suffixes == ()


@pytest.mark.parametrize("entry", ["x.example.com]", "[x.example.com"])
def test_a_half_bracketed_entry_is_refused(entry: str):
    with pytest.raises(CallbackRefused, match="is not a valid host name"):
        HostPolicy.parse([entry])


@pytest.mark.parametrize(("entry", "shown"), [("bad host", "bad host"), ("*.bad host", "bad host"),
                                              ("*.ok.example.com, x", "ok.example.com, x")])
def test_a_bad_entry_is_refused_naming_the_setting_and_the_entry(entry: str, shown: str):
    with pytest.raises(CallbackRefused) as info:
        HostPolicy.parse([entry])
    assert str(info.value) == f"IMGQ_CALLBACK_HOSTS entry: {shown!r} is not a valid host name"
