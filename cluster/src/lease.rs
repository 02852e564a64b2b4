//! The lease a member holds on the vnodes the applied map gives it.
//!
//! The leader gives a member's vnodes to the others once it has not heard from it for
//! `failover_after` (a failover: no hand-over). The member cannot tell it happened until it
//! hears from the leader again, and in the meantime it may take exports for those vnodes: a
//! frozen process (`SIGSTOP`, a stalled VM) or one cut off by the network finds, when it
//! resumes, the exports that waited in its sockets, whose senders gave up long ago and sent them
//! again to the new owners. Merged there too, they were counted twice.
//!
//! So a member merges only while it holds a lease: it was in touch with a leader within half of
//! `failover_after` (a follower accepted the leader's append-entries, a leader had a quorum's
//! acknowledgement). Once the lease lapsed, it is regained only when the member is back in touch
//! and has applied what the leader reported committed, so that it knows where its vnodes went.
//! A follower's contact counts from when it handled the leader's message, not when the leader
//! sent it: what waited in its sockets during a freeze is handled in the first moments after it
//! resumes, and may be old. It must be back in touch for `settle` (an election timeout, many
//! heartbeats) before it merges again, so that the leader's commit it applied is a recent one. A
//! leader's contact is the sending time of the message a quorum acknowledged (openraft's), never
//! old.

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
    /// The contact is a leader's quorum acknowledgement (its time is a sending time).
    leading: bool,
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

    /// Contact with a leader at `at`: a follower accepted its append-entries (`leading` false),
    /// or this node, leading, had a quorum acknowledge what it sent at `at`. `commit`: the index
    /// the leader reported committed in its own term.
    pub fn touch(&mut self, at: Instant, commit: Option<u64>, leading: bool) {
        let previous = self.touched;
        if let Some(previous) = previous {
            if at < previous.at {
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
        self.touched = Some(Touch { at, commit, leading });
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
                let settle = if touch.leading { Duration::ZERO } else { self.settle };
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
    fn test_a_new_member_holds_no_lease_until_a_leader_reached_it_and_it_settled() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        assert_eq!(lease.check(t0, 0), LeaseCheck::Lapsed { last_contact: None });
        lease.touch(after(t0, 100), Some(5), false);
        assert!(!lease.check(after(t0, 100), 5).holds(), "not settled");
        lease.touch(after(t0, 600), Some(5), false);
        assert!(!lease.check(after(t0, 600), 5).holds(), "not settled");
        lease.touch(after(t0, 1100), Some(7), false);
        assert!(!lease.check(after(t0, 1100), 6).holds(), "the leader's commit not applied");
        assert!(lease.check(after(t0, 1150), 7).holds());
    }

    #[test]
    fn test_a_member_in_touch_holds_its_lease_through_short_silences() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(1), false);
        lease.touch(after(t0, 1000), Some(1), false);
        assert!(lease.check(after(t0, 1000), 1).holds());
        // An election, a network blip: shorter than the lease.
        assert!(lease.check(after(t0, 30_000), 1).holds());
        lease.touch(after(t0, 30_500), None, false);
        assert!(lease.check(after(t0, 30_500), 1).holds(), "a new leader's first messages do not lapse it");
    }

    #[test]
    fn test_a_frozen_member_merges_nothing_until_it_settled_back_in_touch_and_applied_the_leaders_commit() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(t0, Some(1), false);
        lease.touch(after(t0, 1000), Some(1), false);
        assert!(lease.check(after(t0, 1000), 1).holds());
        // Frozen for a minute. What waited in its sockets is handled at once: an old heartbeat
        // (its commit from before the failover) makes it look in touch.
        let resumed = after(t0, 61_000);
        lease.touch(resumed, Some(1), false);
        assert_eq!(
            lease.check(after(t0, 61_001), 1),
            LeaseCheck::Lapsed { last_contact: Some(Duration::from_millis(1)) }
        );
        // Current heartbeats, the leader's commit (the failover) not applied yet.
        lease.touch(after(t0, 61_500), Some(9), false);
        lease.touch(after(t0, 62_100), Some(9), false);
        assert!(!lease.check(after(t0, 62_100), 1).holds());
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
    fn test_an_old_contact_given_late_changes_nothing() {
        let t0 = Instant::now();
        let mut lease = Lease::new(TERM, SETTLE);
        lease.touch(after(t0, 5000), Some(2), true);
        lease.touch(after(t0, 1000), Some(1), true);
        assert!(lease.check(after(t0, 5000), 2).holds());
        assert!(lease.check(after(t0, 35_000), 2).holds());
        assert!(!lease.check(after(t0, 35_001), 2).holds());
    }
}
