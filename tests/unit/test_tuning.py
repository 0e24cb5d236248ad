"""The worker's batch and thread choice from timings (imgq.tuning), without a model."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgq import tuning
from imgq.tuning import Budget, Choice, Timing


def test_fit_recovers_fixed_and_per_image_costs():
    fixed, per_image = tuning.fit(Timing(8, 0.055 + 8 * 0.0032), Timing(64, 0.055 + 64 * 0.0032))
    assert fixed == pytest.approx(0.055)
    assert per_image == pytest.approx(0.0032)


def test_fit_never_goes_negative_under_noise():
    # The small batch happened to run fast: the line through both points would cross below zero.
    fixed, per_image = tuning.fit(Timing(8, 0.01), Timing(64, 0.5))
    assert fixed == 0.0 and per_image > 0
    # The large batch was no slower (a noisy neighbour slowed the small one): all overhead.
    assert tuning.fit(Timing(8, 0.2), Timing(64, 0.19)) == (0.19, 0.0)


def test_fit_needs_the_larger_batch_second():
    with pytest.raises(ValueError, match="larger batch"):
        tuning.fit(Timing(64, 1.0), Timing(8, 0.1))


@pytest.mark.parametrize("bad", [(0, 1.0), (8, 0.0), (8, -1.0), (8, float("nan"))])
def test_a_timing_needs_a_batch_and_a_time(bad):
    with pytest.raises(ValueError):
        Timing(*bad)


def test_an_overhead_bound_model_gets_the_batch_that_amortises_the_overhead():
    # The tiny model on this CPU: ~55 ms per generate call, ~3.2 ms per image. 10 % overhead needs
    # b >= 0.055 * 0.9 / (0.1 * 0.0032) = 154.7 -> 256, and 256 calls take 0.87 s, within 2 s.
    batch, why = tuning.batch_for(0.055, 0.0032, tuning.CPU)
    assert batch == 256
    assert "55.0 ms per call" in why and "overhead 6% of a call at 256" in why


def test_the_latency_budget_caps_the_batch():
    # H200-like: 0.31 s per call, 0.89 ms per image. Amortising would want 4,096; a call under
    # 1 s fits (1 - 0.31) / 0.00089 = 775 images -> 512.
    batch, why = tuning.batch_for(0.31, 0.00089, tuning.GPU)
    assert batch == 512
    assert "kept to a call under 1 s" in why


def test_the_cap_bounds_the_batch():
    batch, why = tuning.batch_for(0.05, 0.0001, Budget(cap=128, batch_s=10.0))
    assert batch == 128 and "(capped at 128)" in why


def test_a_cheap_overhead_gives_the_smallest_batch():
    assert tuning.batch_for(0.0001, 0.01, tuning.CPU)[0] == tuning.MIN_BATCH


def test_a_model_slower_than_the_budget_per_image_still_batches_the_minimum():
    assert tuning.batch_for(0.5, 3.0, tuning.CPU)[0] == tuning.MIN_BATCH


def test_no_per_image_cost_means_the_cap():
    assert tuning.batch_for(0.2, 0.0, tuning.GPU)[0] == tuning.GPU.cap


@given(fixed=st.floats(0, 5), per_image=st.floats(1e-6, 10), cap=st.sampled_from([8, 64, 256, 1024]),
       batch_s=st.floats(0.01, 10))
def test_the_batch_is_a_power_of_two_within_its_bounds(fixed, per_image, cap, batch_s):
    batch, _ = tuning.batch_for(fixed, per_image, Budget(cap, batch_s))
    assert tuning.MIN_BATCH <= batch <= max(cap, tuning.MIN_BATCH)
    assert batch & (batch - 1) == 0


@given(fixed=st.floats(0, 1), per_image=st.floats(1e-5, 1), more=st.floats(1.0, 100.0))
def test_more_overhead_never_asks_for_a_smaller_batch_until_the_budget_binds(fixed, per_image, more):
    budget = Budget(cap=1 << 20, batch_s=1e9)
    assert tuning.batch_for(fixed * more, per_image, budget)[0] >= tuning.batch_for(fixed, per_image, budget)[0]


@pytest.mark.parametrize(("cores", "model", "decode", "threads"), [
    (2, 0.0017, 0.0045, 1),   # the tiny model: decoding is most of the work
    (2, 2.0, 0.005, 2),       # BLIP-base: the model is everything
    (16, 0.004, 0.004, 8),    # half and half
    (16, 0.0001, 0.05, 1),    # never below one
    (1, 5.0, 0.0, 1),
])
def test_threads_follow_the_models_share_of_the_cpu_work(cores, model, decode, threads):
    chosen, why = tuning.threads_for(cores, model, decode)
    assert chosen == threads
    assert f"on {cores} cores" in why


def test_threads_with_nothing_measured_take_every_core():
    assert tuning.threads_for(4, 0.0, 0.0)[0] == 4


def test_a_choice_says_what_it_chose_and_why():
    text = Choice(64, 1, ("overhead 9% of a call at 64", "model 3 ms")).describe()
    assert text == "batch 64, torch threads 1: overhead 9% of a call at 64; model 3 ms"
    assert Choice(512, 0, ("x",)).describe() == "batch 512: x"


@pytest.mark.parametrize(("one_image_s", "probes"), [
    (0.015, (8, 64)),     # the tiny model, quiet
    (0.1, (4, 32)),       # the tiny model under load: the larger call stays near PROBE_S
    (0.5, (2, 16)),       # a mid-sized model: never fewer than 16 for the slope
    (0.0, (8, 64)),
])
def test_cpu_probe_sizes_follow_the_one_image_call(one_image_s, probes):
    assert tuning.cpu_probes(one_image_s) == probes


def test_a_model_bound_cpu_model_is_not_timed_further():
    assert tuning.cpu_probes(tuning.MODEL_BOUND_S) is None
    assert tuning.cpu_probes(2.5) is None  # BLIP-base at one thread


@pytest.mark.parametrize(("in_flight", "cap"), [(256, 128), (16 * 64, 256), (10, 8), (300, 128)])
def test_the_batch_is_at_most_half_of_what_the_worker_holds(in_flight, cap):
    assert tuning.budget_for(tuning.CPU, in_flight) == Budget(cap=cap, batch_s=tuning.CPU.batch_s)
    assert tuning.batch_for(0.055, 0.0032, tuning.budget_for(tuning.CPU, in_flight))[0] == min(cap, 256)
