"""Eviction policies with an injected clock: every policy joins the shared checks."""

from __future__ import annotations

import pytest

from trims.policy import FIFO, LFU, LRU, POLICIES, CostAware, Policy


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


class PolicyChecks:
    """What every policy must do; a policy's test class joins by setting ``policy``."""

    policy: type[Policy]

    def make(self) -> tuple[Policy, Clock]:
        clock = Clock()
        return self.policy(clock), clock

    def test_only_candidates_are_chosen(self):
        policy, clock = self.make()
        for key in "abc":
            policy.admit(key, 100, reload_cost=1.0)
            clock.tick()
        assert policy.victim(["b", "c"]) in {"b", "c"}
        assert policy.victim(["c"]) == "c"

    def test_forgotten_keys_leave_no_trace(self):
        policy, clock = self.make()
        policy.admit("a", 100)
        policy.forget("a")
        policy.access("a")  # an access to a key the tier no longer holds is ignored
        policy.admit("b", 100)
        assert policy.victim(["b"]) == "b"

    def test_an_unknown_candidate_goes_first(self):
        policy, clock = self.make()
        policy.admit("a", 100)
        assert policy.victim(["a", "stranger"]) == "stranger"

    def test_registered_by_name(self):
        assert POLICIES[self.policy.name] is self.policy


class TestLRU(PolicyChecks):
    policy = LRU

    def test_least_recently_used_goes(self):
        policy, clock = self.make()
        for key in "abc":
            policy.admit(key, 100)
            clock.tick()
        policy.access("a")
        assert policy.victim("abc") == "b"


class TestLFU(PolicyChecks):
    policy = LFU

    def test_least_frequently_used_goes_ties_by_recency(self):
        policy, clock = self.make()
        for key in "abc":
            policy.admit(key, 100)
            clock.tick()
        for _ in range(3):
            policy.access("a")
            clock.tick()
        policy.access("c")
        assert policy.victim("abc") == "b"
        policy.access("b")
        clock.tick()
        policy.access("b")  # b: 3 accesses, c: 2
        assert policy.victim("abc") == "c"


class TestFIFO(PolicyChecks):
    policy = FIFO

    def test_first_admitted_goes_however_popular(self):
        policy, clock = self.make()
        for key in "abc":
            policy.admit(key, 100)
            clock.tick()
        for _ in range(10):
            policy.access("a")
        assert policy.victim("abc") == "a"


class TestCostAware(PolicyChecks):
    policy = CostAware

    def test_cheap_to_reload_bytes_go_first(self):
        policy, clock = self.make()
        policy.admit("big-on-disk", 4_000_000_000, reload_cost=4.0)  # 1 s per GB
        policy.admit("small-in-cloud", 100_000_000, reload_cost=2.0)  # 20 s per GB
        assert policy.victim(["big-on-disk", "small-in-cloud"]) == "big-on-disk"

    def test_popularity_raises_what_a_key_is_worth(self):
        policy, clock = self.make()
        policy.admit("a", 1000, reload_cost=1.0)
        policy.admit("b", 1000, reload_cost=1.0)
        policy.access("b")
        assert policy.victim("ab") == "a"

    def test_old_entries_age_out_through_inflation(self):
        policy, clock = self.make()
        policy.admit("precious", 1000, reload_cost=5.0)  # priority 0.005
        for i in range(10):  # a stream of cheap models, each evicted in turn
            policy.admit(f"m{i}", 1000, reload_cost=1.0 * (i + 1))
            victim = policy.victim(["precious", f"m{i}"])
            policy.forget(victim)
            if victim == "precious":
                break
        assert victim == "precious"  # once inflation passes its credit, untouched value goes


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_tested(name):
    assert any(cls.policy is POLICIES[name] for cls in PolicyChecks.__subclasses__())
