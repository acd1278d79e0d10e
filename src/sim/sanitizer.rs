//! The stream sanitizer: happens-before tracking of every access to device memory and pinned
//! host memory, with vector clocks.
//!
//! Agents are the streams (by handle) and the host (agent 0). Each agent has a clock, a map from
//! agent to the last sequence number of that agent's work known to have finished before the
//! agent's next access:
//!
//! * a stream's clock advances with each task queued on it and joins the host's clock at every
//!   enqueue (work queued after a host action is ordered after it);
//! * `aclrtStreamWaitEvent` joins the clock captured by the event's record into the waiting
//!   stream's clock;
//! * a host synchronize (stream, event, device, or a query that found the event complete) joins
//!   the stream's (or event's) clock into the host's.
//!
//! Every allocation keeps the epoch of its last write and of the reads since (one per agent).
//! An access conflicts with an earlier one when at least one of them writes and the earlier
//! epoch is not covered by the accessing agent's clock: nothing orders the two, so on hardware
//! they may run at the same time or in either order. Freeing memory is a host write that also
//! requires every earlier access to have *finished* (be covered by the host clock).
//!
//! Accesses are tracked per allocation, not per byte: two streams writing disjoint halves of one
//! allocation without ordering are reported too (the safe layer tracks whole buffers as well).

use std::collections::HashMap;

/// The host, as an agent.
pub(crate) const HOST: u64 = 0;

/// What each agent is known to have finished: agent -> sequence number.
pub(crate) type Clock = HashMap<u64, u64>;

/// `into = max(into, from)` element-wise.
pub(crate) fn join(into: &mut Clock, from: &Clock) {
    for (agent, seq) in from {
        let e = into.entry(*agent).or_insert(0);
        if *e < *seq {
            *e = *seq;
        }
    }
}

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// One access: who, when (sequence number of that agent) and through which API.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Epoch {
    pub agent: u64,
    pub seq: u64,
    pub api: &'static str,
    pub access: Access,
}

impl Epoch {
    /// Whether an agent whose clock is `clock` is ordered after this access.
    fn covered_by(&self, agent: u64, clock: &Clock) -> bool {
        self.agent == agent || clock.get(&self.agent).copied().unwrap_or(0) >= self.seq
    }
}

/// The accesses of one allocation that later accesses must be ordered after.
#[derive(Default, Debug)]
pub(crate) struct History {
    write: Option<Epoch>,
    reads: Vec<Epoch>,
}

/// Names an agent for messages.
pub(crate) fn agent_name(agent: u64) -> String {
    if agent == HOST { "the host".to_string() } else { format!("stream {agent:#x}") }
}

fn access_name(a: Access) -> &'static str {
    match a {
        Access::Read => "reads",
        Access::Write => "writes",
    }
}

impl History {
    /// Checks `epoch` (made with `clock`) against the history, returns a description of every
    /// conflict, and records the access.
    pub fn access(&mut self, epoch: Epoch, clock: &Clock, what: &str) -> Vec<String> {
        let mut earlier: Vec<Epoch> = self.write.iter().copied().collect();
        if epoch.access == Access::Write {
            earlier.extend(self.reads.iter().copied());
        }
        let conflicts = earlier
            .into_iter()
            .filter(|e| !e.covered_by(epoch.agent, clock))
            .map(|e| {
                format!(
                    "unordered access to {what}: {} on {} {} it, but {} on {} {} it and no event wait or \
                     synchronize orders the two",
                    epoch.api,
                    agent_name(epoch.agent),
                    access_name(epoch.access),
                    e.api,
                    agent_name(e.agent),
                    if e.access == Access::Write { "wrote" } else { "read" },
                )
            })
            .collect();
        match epoch.access {
            Access::Write => {
                self.write = Some(epoch);
                self.reads.clear();
            }
            Access::Read => {
                self.reads.retain(|r| r.agent != epoch.agent);
                self.reads.push(epoch);
            }
        }
        conflicts
    }

    /// Every access that the host has not seen finish, for a free of the memory.
    pub fn unfinished(&self, host_clock: &Clock) -> Vec<Epoch> {
        self.write
            .iter()
            .chain(self.reads.iter())
            .filter(|e| e.agent != HOST && !e.covered_by(HOST, host_clock))
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(agent: u64, seq: u64, access: Access) -> Epoch {
        Epoch { agent, seq, api: "op", access }
    }

    #[test]
    fn same_agent_is_ordered_and_other_agents_need_a_clock() {
        let mut h = History::default();
        assert!(h.access(epoch(7, 1, Access::Write), &Clock::new(), "x").is_empty());
        assert!(h.access(epoch(7, 2, Access::Read), &Clock::new(), "x").is_empty());
        // Stream 9 writes without knowing stream 7's work: two conflicts (write and read).
        let c = h.access(epoch(9, 1, Access::Write), &Clock::new(), "x");
        assert_eq!(c.len(), 2, "{c:?}");
        let mut h = History::default();
        h.access(epoch(7, 1, Access::Write), &Clock::new(), "x");
        let clock: Clock = [(7, 1)].into_iter().collect();
        assert!(h.access(epoch(9, 1, Access::Read), &clock, "x").is_empty());
        assert!(h.access(epoch(11, 1, Access::Read), &clock, "x").is_empty(), "reads never conflict with reads");
        let only_9: Clock = [(7, 1), (9, 1)].into_iter().collect();
        let c = h.access(epoch(13, 1, Access::Write), &only_9, "x");
        assert_eq!(c.len(), 1, "the read of stream 11 is unordered: {c:?}");
        assert!(c[0].contains("stream 0xb"));
    }

    #[test]
    fn unfinished_lists_work_the_host_has_not_seen_finish() {
        let mut h = History::default();
        h.access(epoch(7, 3, Access::Write), &Clock::new(), "x");
        assert_eq!(h.unfinished(&Clock::new()).len(), 1);
        let seen: Clock = [(7, 3)].into_iter().collect();
        assert!(h.unfinished(&seen).is_empty());
        let mut joined = Clock::new();
        join(&mut joined, &[(7, 2)].into_iter().collect());
        join(&mut joined, &seen);
        assert_eq!(joined[&7], 3);
    }
}
