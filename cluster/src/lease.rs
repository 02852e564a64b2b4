//! The lease a member holds on the vnodes the applied map gives it.
//!
//! The leader gives a member's vnodes to the others once it has not heard from it for
//! `failover_after` (a failover: no hand-over). The member cannot tell it happened until it
//! hears from the leader again, and in the meantime it may take exports for those vnodes: a
//! frozen process (`SIGSTOP`, a stalled VM) or one cut off by the network finds, when it
//! resumes, the exports that waited in its sockets, whose senders gave up long ago and sent them
//! again to the new owners. Merged there too, they were counted twice.
//!
//! So a member merges only while it holds a lease: within half of `failover_after` of when it
//! sent a request that a leader with a majority answered. A follower renews it with the `Lease`
//! RPC (the leader answers, with what it committed in its term, while a majority acknowledged
//! it within two election timeouts and the member acknowledged its messages within a quarter of
//! `failover_after`: failover counts from those); a leader's is its last quorum acknowledgement
//! (openraft's, also a sending time). Both are times this node sent something, after which the
//! answer was given: never old, whatever waited in sockets. Once the lease lapsed, it is
//! regained by an answer to a request sent after the lease ran out (after the lapse was seen, or
//! longer than the lease after the previous contact), once this node applied the commit that
//! answer reported, so that it knows where its vnodes went.
//!
//! A leader that predates the `Lease` RPC cannot renew anything: its followers count its
//! append-entries instead (the time they handled one, and the commit it reported). That contact
//! may be old (a message that waited in a socket during a freeze is handled in the first moments
//! after it), so after a lapse such a follower must be back in touch for `settle` (an election
//! timeout, many heartbeats) before it merges again; and a leader cut off from the majority still
//! sends them. Only a cluster in the middle of an upgrade relies on it.

use std::time::{Duration, Instant};

/// A member's lease on its vnodes (see the module's documentation). Times are given by the
/// caller, so that the rules can be tested without waiting.
#[derive(Debug)]
pub struct Lease {
    /// Out of touch longer than this, the lease lapses: half of `failover_after`.
    term: Duration,
    /// How long a follower must be back in touch before it merges again.
    settle: Duration,
    /// The last contact with a leader.
    touched: Option<Touch>,
    /// Set while the lease is lapsed.
    lapsed: Option<Lapse>,
}

#[derive(Clone, Copy, Debug)]
struct Touch {
    at: Instant,
    /// What the leader reported committed, if it committed it in its own term (a new leader's
    /// report of an earlier term's commit may be behind what the old leader committed).
    commit: Option<u64>,
    /// The contact's time is when this node sent what was answered (a lease renewal, a leader's
    /// message a quorum acknowledged), not when it handled a leader's message.
    sent: bool,
}

#[derive(Clone, Copy, Debug)]
struct Lapse {
    /// When the lapse was seen.
    seen: Instant,
    /// The first contact after it.
    back: Option<Instant>,
}

/// What a check of the lease found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseCheck {
    /// Held: the member merges.
    Held,
    /// Lapsed: the member merges nothing. `last_contact`: how long ago it was last in touch, if
    /// ever.
    Lapsed { last_contact: Option<Duration> },
}

impl LeaseCheck {
    /// Whether the member merges.
    pub fn holds(self) -> bool {
        self == LeaseCheck::Held
    }
}

impl Lease {
    /// A lease lapsing after `term` out of touch, regained after `settle` back in touch. A new
    /// member holds none until it is in touch.
    pub fn new(term: Duration, settle: Duration) -> Lease {
        Lease { term, settle, touched: None, lapsed: None }
    }

    /// Contact with a leader at `at`: a leader answered what this node sent at `at` (`sent`: a
    /// lease renewal, or this node leads and a quorum acknowledged it), or this node handled a
    /// leader's append-entries at `at`. `commit`: the index the leader reported committed in its
    /// own term (`None`: none yet, and the lease is not regained with it).
    pub fn touch(&mut self, at: Instant, commit: Option<u64>, sent: bool) {
        let previous = self.touched;
        // Committed indexes only grow: an answer handled late does not lower what must be applied.
        let commit = commit.map(|c| c.max(previous.and_then(|p| p.commit).unwrap_or(0)));
        if let Some(previous) = previous {
            if at < previous.at {
                self.touched = Some(Touch { commit: commit.or(previous.commit), ..previous });
                return;
            }
        }
        let out_of_touch = previous.is_none_or(|p| at.saturating_duration_since(p.at) > self.term);
        if out_of_touch {
            self.lapsed = Some(Lapse { seen: at, back: Some(at) });
        } else if let Some(lapse) = self.lapsed.as_mut() {
            if lapse.back.is_none() && at > lapse.seen {
                lapse.back = Some(at);
            }
        }
        self.touched = Some(Touch { at, commit, sent });
    }

    /// Whether the lease is held at `now`, this node having applied its log up to `applied`.
    pub fn check(&mut self, now: Instant, applied: u64) -> LeaseCheck {
        let last_contact = self.touched.map(|t| now.saturating_duration_since(t.at));
        let in_touch = last_contact.is_some_and(|ago| ago <= self.term);
        let Some(lapse) = self.lapsed else {
            if in_touch {
                return LeaseCheck::Held;
            }
            self.lapsed = Some(Lapse { seen: now, back: None });
            return LeaseCheck::Lapsed { last_contact };
        };
        let regained = in_touch
            && self.touched.zip(lapse.back).is_some_and(|(touch, back)| {
                let settle = if touch.sent { Duration::ZERO } else { self.settle };
                touch.at >= back + settle && touch.commit.is_some_and(|commit| applied >= commit)
            });
        if regained {
            self.lapsed = None;
            LeaseCheck::Held
        } else {
            LeaseCheck::Lapsed { last_contact }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: Duration = Duration::from_secs(30);
    const SETTLE: Duration = Duration::from_secs(1);

    fn after(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn test_a_new_member_holds_no_lease_until_a_leader_answered_it_and_it_applied_the_commit() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        assert_eq!(lease.check(t0, 0), LeaseCheck::Lapsed { last_contact: None });
        lease.touch(after(t0, 100), Some(7), true);
        assert!(!lease.check(after(t0, 110), 6).holds(), "the leader's commit not applied");
        assert!(lease.check(after(t0, 120), 7).holds(), "an answer to what it sent needs no settling");
    }

    #[test]
    fn test_a_member_renewing_holds_its_lease_through_short_silences() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(1), true);
        assert!(lease.check(after(t0, 10), 1).holds());
        // An election, a network blip: shorter than the lease.
        assert!(lease.check(after(t0, 30_000), 1).holds());
        lease.touch(after(t0, 29_000), Some(3), true);
        assert!(lease.check(after(t0, 30_500), 1).holds(), "held: what it applies matters after a lapse only");
        assert!(!lease.check(after(t0, 59_001), 3).holds(), "lapsed 30 s after the last renewal was sent");
    }

    #[test]
    fn test_after_a_lapse_only_an_answer_to_a_renewal_sent_after_it_was_seen_counts() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(1), true);
        assert!(lease.check(t0, 1).holds());
        // Frozen for a minute right after sending a renewal; its answer is handled on resuming.
        lease.touch(after(t0, 300), Some(1), true);
        assert_eq!(
            lease.check(after(t0, 60_300), 1),
            LeaseCheck::Lapsed { last_contact: Some(Duration::from_secs(60)) },
            "the last contact is when the renewal was sent, not when its answer came"
        );
        // A renewal sent after the lapse was seen: the failover it reports must be applied first.
        lease.touch(after(t0, 60_400), Some(9), true);
        assert!(!lease.check(after(t0, 60_450), 1).holds());
        // An older answer handled late does not lower what must be applied.
        lease.touch(after(t0, 60_350), Some(2), true);
        assert!(!lease.check(after(t0, 60_460), 2).holds());
        assert!(lease.check(after(t0, 60_500), 9).holds());
    }

    #[test]
    fn test_with_a_leader_that_predates_renewals_its_heartbeats_count_once_settled() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(1), false);
        lease.touch(after(t0, 1000), Some(1), false);
        assert!(lease.check(after(t0, 1000), 1).holds(), "settled, and applied");
        // Frozen for a minute. What waited in its sockets is handled at once: an old heartbeat
        // (its commit from before the failover) makes it look in touch.
        let resumed = after(t0, 61_000);
        lease.touch(resumed, Some(1), false);
        assert_eq!(
            lease.check(after(t0, 61_001), 1),
            LeaseCheck::Lapsed { last_contact: Some(Duration::from_millis(1)) }
        );
        // Current heartbeats, the leader's commit (the failover) not applied yet; an old one
        // handled among them does not lower it.
        lease.touch(after(t0, 61_500), Some(9), false);
        lease.touch(after(t0, 62_100), Some(4), false);
        assert!(!lease.check(after(t0, 62_100), 4).holds());
        assert!(lease.check(after(t0, 62_200), 9).holds());
    }

    #[test]
    fn test_a_lapse_seen_before_contact_resumes_waits_for_contact_after_it() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(1), false);
        // Cut off: seen lapsed while out of touch.
        assert!(!lease.check(after(t0, 31_000), 1).holds());
        assert!(!lease.check(after(t0, 90_000), 1).holds());
        // Back: settles from the first contact, however long the lapse was seen before.
        lease.touch(after(t0, 100_000), Some(4), false);
        assert!(!lease.check(after(t0, 100_000), 4).holds());
        lease.touch(after(t0, 101_000), Some(4), false);
        assert!(lease.check(after(t0, 101_000), 4).holds());
    }

    #[test]
    fn test_a_leader_regains_its_lease_with_a_quorum_acknowledgement_of_what_it_sent_after_the_lapse() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(3), true);
        assert!(lease.check(t0, 3).holds(), "a leader's contact needs no settling");
        // Acknowledgements stop (frozen, cut off), and the lapse is seen.
        assert!(!lease.check(after(t0, 40_000), 3).holds());
        // A late acknowledgement of what it sent before the lapse was seen does not regain it.
        lease.touch(after(t0, 20_000), Some(3), true);
        assert!(!lease.check(after(t0, 40_001), 3).holds());
        lease.touch(after(t0, 40_100), Some(4), true);
        assert!(!lease.check(after(t0, 40_100), 3).holds(), "its own commit not applied yet");
        assert!(lease.check(after(t0, 40_101), 4).holds());
    }

    #[test]
    fn test_a_new_leader_without_a_commit_in_its_term_does_not_end_a_lapse() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(5), true);
        assert!(lease.check(t0, 5).holds());
        assert!(!lease.check(after(t0, 31_000), 5).holds());
        lease.touch(after(t0, 32_000), None, true);
        assert!(!lease.check(after(t0, 32_001), 5).holds());
        lease.touch(after(t0, 32_500), Some(6), true);
        assert!(lease.check(after(t0, 32_501), 6).holds());
    }
}
