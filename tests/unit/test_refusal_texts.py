"""Pure core modules, where mutation testing found answers or messages nothing pinned down: the reason a
callback address is refused (the operator's only clue), cost limits for stored records and at the
boundary, the token bucket at zero and in debt, and the refusal texts of crontab schedules,
languages and caption parameters."""

from __future__ import annotations

import pytest

from imgq.callbacks import HostPolicy, address_refusal
from imgq.cost import check_cost
from imgq.errors import BadParams, CostLimitExceeded, UnknownLanguage
from imgq.languages import LANGUAGES, language
from imgq.nightly import parse_cron
from imgq.pacing import TokenBucket
from imgq.params import parse_params


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("0.0.0.0", "0.0.0.0 is unspecified"),
        ("169.254.169.254", "169.254.169.254 is link-local"),  # cloud metadata
        ("224.0.0.1", "224.0.0.1 is multicast"),
        ("240.0.0.1", "240.0.0.1 is reserved"),
        ("100.64.0.1", "100.64.0.1 is shared (100.64.0.0/10)"),
        ("10.0.0.1", "10.0.0.1 is private"),
        ("fec0::1", "fec0::1 is site-local"),
        # IPv4-compatible ::a.b.c.d embeds its IPv4 from ::2 up (:: and ::1 are themselves)
        ("::2", "::2 embeds 0.0.0.2, which is private"),
        ("2002:a00:1::1", "2002:a00:1::1 embeds 10.0.0.1, which is private"),  # 6to4
        ("93.184.216.34", None),
    ],
)
def test_a_refused_callback_address_says_why(address: str, reason: str | None) -> None:
    assert address_refusal(address, HostPolicy.parse([])) == reason


def record(kind: str, **params: object) -> dict[str, object]:
    return {"kind": kind, "model": "m", "params": params}


def test_a_stored_caption_record_without_beams_or_tokens_is_checked_at_the_defaults() -> None:
    check_cost([record("caption")], {"num_beams": 1, "max_new_tokens": 30})
    with pytest.raises(CostLimitExceeded) as exc:
        check_cost([record("caption")], {"num_beams": 1, "max_new_tokens": 29})
    assert str(exc.value) == "caption max_new_tokens 30 exceeds this tenant's limit of 29"


def test_every_caption_task_is_checked_whatever_comes_before_it() -> None:
    with pytest.raises(CostLimitExceeded) as exc:
        check_cost([record("embed"), record("caption", num_beams=9)], {"num_beams": 4})
    assert str(exc.value) == "caption num_beams 9 exceeds this tenant's limit of 4"


def test_an_item_cost_equal_to_the_limit_is_allowed_and_the_refusal_lists_the_kinds() -> None:
    check_cost([record("embed")], {"item_cost": 0.3})
    with pytest.raises(CostLimitExceeded) as exc:
        check_cost([record("caption", num_beams=2), record("embed")], {"item_cost": 2})
    assert str(exc.value) == ("item_cost 2.7 (caption,embed; docs/scaling.md, 'Priority and fairness') exceeds "
                              "this tenant's limit of 2")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_taking_nothing_or_a_fraction_is_allowed_and_a_negative_amount_is_not() -> None:
    bucket = TokenBucket(rate=2, burst=2, clock=Clock())
    assert bucket.reserve(0) == 0.0
    assert bucket.tokens == 2.0
    assert bucket.reserve(0.5) == 0.0
    assert bucket.tokens == 1.5
    with pytest.raises(ValueError) as exc:
        bucket.reserve(-1)
    assert str(exc.value) == "cannot take -1 units"


def test_units_left_over_cost_no_wait_and_debt_is_waited_out_at_the_rate() -> None:
    bucket = TokenBucket(rate=1, burst=2, clock=Clock())
    assert bucket.reserve(1.5) == 0.0  # 0.5 left: no wait
    assert bucket.reserve(1.5) == 1.0  # 1 unit of debt at 1 unit/s


@pytest.mark.parametrize(("rate", "burst", "message"), [
    (0, None, "rate must be positive, not 0"),
    (-2.5, None, "rate must be positive, not -2.5"),
    (1, 0, "burst must be positive, not 0"),
    (1, -1, "burst must be positive, not -1"),
])
def test_a_bucket_needs_a_positive_rate_and_burst(rate: float, burst: float | None, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        TokenBucket(rate=rate, burst=burst)
    assert str(exc.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ("0 2 * *", "a schedule is five crontab fields (minute hour day month weekday), not '0 2 * *'"),
    ("0 2 * * * *", "a schedule is five crontab fields (minute hour day month weekday), not '0 2 * * * *'"),
    ("0 2 * * mon;", "crontab field 'mon;' of '0 2 * * mon;' is malformed"),
    # Well formed but out of range: refused at configuration, not by beat as an internal error.
    ("61 2 * * *", "crontab minute '61' of '61 2 * * *': Invalid end range: 61 > 59."),
    ("0 0 0 * *", "crontab day of month '0' of '0 0 0 * *': Invalid beginning range: 0 < 1."),
    ("0 0 * * 8", "crontab day of week '8' of '0 0 * * 8': Invalid end range: 8 > 6."),
])
def test_a_malformed_schedule_is_refused_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_cron(text)
    assert str(exc.value) == message


def test_an_unknown_language_is_refused_with_the_known_codes() -> None:
    with pytest.raises(UnknownLanguage) as exc:
        language("xx")
    known = sorted(LANGUAGES)
    assert "de" in known and "fr" in known
    assert str(exc.value) == f"unknown language 'xx'; known: {', '.join(known)}"


def test_bad_caption_parameters_are_named_as_generation_parameters() -> None:
    with pytest.raises(BadParams) as exc:
        parse_params({"num_beams": 0})
    assert str(exc.value) == "invalid generation parameters: num_beams: Input should be greater than or equal to 1"


@pytest.mark.parametrize("host", ["example.0x7f", "a..b"])
def test_a_host_name_that_is_not_a_dns_name_is_refused_naming_it(host: str) -> None:
    from imgq.callbacks import _hostname
    from imgq.errors import CallbackRefused

    with pytest.raises(CallbackRefused) as exc:
        _hostname(host, what="callback host")
    assert str(exc.value) == f"callback host: {host!r} is not a valid host name"


def test_a_hex_looking_label_inside_a_name_is_fine() -> None:
    from imgq.callbacks import _hostname

    assert _hostname("0xcafe.Example.com", what="callback host") == "0xcafe.example.com"


@pytest.mark.parametrize(("n", "power"), [(0.5, 1), (1, 1), (1.5, 2), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_pow2_ceil_is_the_smallest_power_of_two_at_least_n(n: float, power: int) -> None:
    from imgq.tuning import _pow2_ceil

    assert _pow2_ceil(n) == power


@pytest.mark.parametrize(
    ("fixed", "per_image", "budget", "batch", "why"),
    [
        # free batching: the cap
        (0.05, 0.0, (256, 2.0), 256, "a call costs the same whatever its size (50.0 ms): the cap"),
        # overhead at most 10 %: 7 ms / (7 ms + 64 x 1 ms) -> 64 (63 images would do)
        (0.007, 0.001, (256, 2.0), 64, "7.0 ms per call + 1.00 ms per image; overhead 10% of a call at 64"),
        # wanted exactly the cap: no "capped" note
        (0.028, 0.001, (256, 2.0), 256, "28.0 ms per call + 1.00 ms per image; overhead 10% of a call at 256"),
        # wanted more than the cap
        (0.1, 0.001, (256, 2.0), 256,
         "100.0 ms per call + 1.00 ms per image; overhead 28% of a call at 256 (capped at 256)"),
        (0.1, 0.001, (256, 0.357), 256,
         "100.0 ms per call + 1.00 ms per image; overhead 28% of a call at 256 (capped at 256)"),
        # the call budget binds before the cap
        (0.1, 0.001, (256, 0.2), 64,
         "100.0 ms per call + 1.00 ms per image; overhead 61% of a call at 64 (kept to a call under 0.2 s)"),
        # a model too slow for the budget: the smallest batch, no note
        (2.0, 0.5, (256, 2.0), 8, "2000.0 ms per call + 500.00 ms per image; overhead 33% of a call at 8"),
    ],
)
def test_the_batch_is_the_smallest_power_of_two_with_overhead_at_most_a_tenth_within_the_budget(
    fixed: float, per_image: float, budget: tuple[int, float], batch: int, why: str
) -> None:
    from imgq.tuning import Budget, batch_for

    assert batch_for(fixed, per_image, Budget(*budget)) == (batch, why)


def test_translate_params_name_unknown_source_and_repeated_languages() -> None:
    from imgq.params import TranslateParams, validate_params

    with pytest.raises(BadParams) as exc:
        validate_params(TranslateParams, {"langs": ["de", "xx", "en"]})
    assert str(exc.value) == "invalid parameters: langs: unknown or source language 'xx', 'en'"
    with pytest.raises(BadParams) as exc:
        validate_params(TranslateParams, {"langs": ["de", "fr", "de"]})
    assert str(exc.value) == "invalid parameters: langs: a language appears twice"


@pytest.mark.parametrize(("n", "power"), [(0.5, 1), (1, 1), (1.5, 1), (2, 2), (3, 2), (100, 64), (0, 1), (-3, 1)])
def test_pow2_floor_is_the_largest_power_of_two_at_most_n_and_at_least_1(n: float, power: int) -> None:
    from imgq.tuning import _pow2_floor

    assert _pow2_floor(n) == power


def test_a_timing_of_one_image_is_valid_and_an_empty_or_instant_one_is_not() -> None:
    from imgq.tuning import Timing, fit

    assert Timing(1, 0.01).batch == 1
    for batch, seconds in ((0, 1.0), (4, 0.0)):
        with pytest.raises(ValueError) as exc:
            Timing(batch, seconds)
        assert str(exc.value) == f"a timing needs a positive batch and time, got {batch} in {seconds} s"
    with pytest.raises(ValueError) as exc:
        fit(Timing(8, 0.1), Timing(8, 0.2))
    assert str(exc.value) == "the second timing needs the larger batch"


@pytest.mark.parametrize(("cores", "model_s", "decode_s", "threads", "why"), [
    (8, 0.003, 0.001, 6, "model 3.00 ms, decode 1.00 ms CPU per image: the model is 75% of the work on 8 cores"),
    (4, 0.0, 0.0, 4, "model 0.00 ms, decode 0.00 ms CPU per image: the model is 100% of the work on 4 cores"),
])
def test_torch_gets_the_models_share_of_the_cores(cores: int, model_s: float, decode_s: float, threads: int,
                                                   why: str) -> None:
    from imgq.tuning import threads_for

    assert threads_for(cores, model_s, decode_s) == (threads, why)


POLICY = ["hooks.example.com", "203.0.113.0/24", "2001:db8::/32"]


@pytest.mark.parametrize(("url", "message"), [
    ("", "callback_url is empty"),
    ("https://hooks.example.com/" + "a" * 2023, "callback_url is longer than 2048 characters"),
    ("https://hooks.example.com/a\x7fb", "callback_url contains whitespace or control characters"),
    ("https://hooks.example.com/a b", "callback_url contains whitespace or control characters"),
    ("hooks.example.com/cb", "callback_url scheme '(none)' is not allowed: use http or https"),
    ("ftp://hooks.example.com/cb", "callback_url scheme 'ftp' is not allowed: use http or https"),
    ("https://u:p@hooks.example.com/cb", "callback_url must not contain userinfo (user:password@)"),
    ("https:///cb", "callback_url has no host"),
    ("https://[fe80::1%25eth0]/cb", "callback_url must not name an IPv6 zone"),
    ("https://other.example.com/cb", "callback host 'other.example.com' is not on IMGQ_CALLBACK_HOSTS"),
    ("https://bad_name.example.com/cb", "callback_url: 'bad_name.example.com' is not a valid host name"),
    ("https://hooks.example.com:0/cb", "callback_url port 0 is not allowed"),
])
def test_a_refused_callback_url_says_what_is_wrong(url: str, message: str) -> None:
    from imgq.callbacks import parse_callback_url
    from imgq.errors import CallbackRefused

    with pytest.raises(CallbackRefused) as exc:
        parse_callback_url(url, HostPolicy.parse(POLICY))
    assert str(exc.value) == message


def test_callbacks_are_disabled_without_hosts() -> None:
    from imgq.callbacks import parse_callback_url
    from imgq.errors import CallbackRefused

    with pytest.raises(CallbackRefused) as exc:
        parse_callback_url("https://hooks.example.com/cb", HostPolicy.parse([]))
    assert str(exc.value) == "callbacks are disabled: IMGQ_CALLBACK_HOSTS is empty"


@pytest.mark.parametrize(("url", "target"), [
    ("https://hooks.example.com./cb?x=1", ("https://hooks.example.com/cb?x=1", "hooks.example.com", 443, None)),
    ("http://HOOKS.example.com", ("http://hooks.example.com/", "hooks.example.com", 80, None)),
    ("http://hooks.example.com:81/cb", ("http://hooks.example.com:81/cb", "hooks.example.com", 81, None)),
    ("https://203.0.113.7:8443/cb", ("https://203.0.113.7:8443/cb", "203.0.113.7", 8443, "203.0.113.7")),
    ("http://[2001:db8::1]/cb", ("http://[2001:db8::1]/cb", "2001:db8::1", 80, "2001:db8::1")),
    ("https://hooks.example.com/" + "a" * 2022, None),  # exactly 2048 characters: allowed
])
def test_an_allowed_callback_url_is_normalized_with_its_port_and_address(url: str, target) -> None:
    from imgq.callbacks import parse_callback_url

    got = parse_callback_url(url, HostPolicy.parse(POLICY))
    if target is None:
        assert len(url) == 2048 and got.url == url
        return
    assert (got.url, got.host, got.port, None if got.ip is None else str(got.ip)) == target


def test_the_settings_callback_hosts_are_the_policy() -> None:
    from types import SimpleNamespace

    from imgq.callbacks import check_callback_url
    from imgq.errors import CallbackRefused

    assert check_callback_url("https://hooks.example.com/cb", SimpleNamespace(callback_hosts=POLICY)) == (
        "https://hooks.example.com/cb")
    with pytest.raises(CallbackRefused):
        check_callback_url("https://hooks.example.com/cb", SimpleNamespace())


def test_text_postgres_cannot_store_is_found_anywhere_in_a_value() -> None:
    from imgq.storable import first_unstorable, unstorable

    assert unstorable("a photo of") is None and unstorable("café ☕") is None
    assert unstorable("a\x00b") == "a NUL character"
    assert unstorable("a\ud800") == "text that is not UTF-8 (a lone surrogate)"
    assert first_unstorable({"langs": ["de", "fr"], "n": 3}) is None
    assert first_unstorable({"langs": ["de", "f\x00r"]}) == "a NUL character"
    assert first_unstorable({"k\ud800": 1}) == "text that is not UTF-8 (a lone surrogate)"
