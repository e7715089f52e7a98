//! The clients' history (every submit, read and kill with when it was
//! invoked and when it returned) and its linearizability check.
//!
//! The check is per application name (P-compositionality: a history is
//! linearizable when each object's is), against a sequential model of one
//! application, with stateright's `LinearizabilityTester`: a read must see
//! the application exactly when its submission took effect before it, the
//! id its submission returned, a state no earlier than any read before it
//! (submitted < accepted < running < final), the same final state as any
//! earlier read, and a final state after an acknowledged kill. An
//! operation that failed without a definite answer (a deadline, no leader)
//! is left in flight for ever: it may have taken effect at any point after
//! its invocation, or never (Jepsen's and Porcupine's treatment). Its
//! worker goes on as a new "thread".

use std::collections::BTreeMap;
use std::time::Instant;

use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// A worker and its incarnation (bumped after an operation whose outcome
/// is unknown).
pub type Thread = (u32, u32);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Submit,
    /// GetApplication by id, or ListApplications filtered by the name.
    Read,
    Kill,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ret {
    Submitted(String),
    /// Not found, or found with this id in this state
    /// (`pb::ApplicationState` as i32).
    Seen(Option<(String, i32)>),
    /// A list read that found this many applications under one name.
    Many(usize),
    Killed,
    NoSuchApp,
}

#[derive(Clone, Debug)]
pub struct Event {
    pub key: String,
    pub thread: Thread,
    pub op: Op,
    pub invoked: Instant,
    /// None: no definite answer (left in flight).
    pub returned: Option<(Instant, Ret)>,
}

/// Submitted 1, accepted 2, running 3, then the final states 4, 5, 6.
fn rank(state: i32) -> i32 {
    state.min(4)
}

fn is_final(state: i32) -> bool {
    state >= 4
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
enum Id {
    #[default]
    Unset,
    /// Submitted by an operation whose answer never came: any id.
    Any,
    Is(String),
}

/// One application as the clients may observe it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct App {
    id: Id,
    rank: i32,
    final_state: Option<i32>,
    killed: bool,
}

impl SequentialSpec for App {
    type Op = Op;
    type Ret = Ret;

    /// Only used for operations left in flight, whose answer is ignored.
    fn invoke(&mut self, op: &Op) -> Ret {
        match op {
            Op::Submit => {
                if self.id == Id::Unset {
                    self.id = Id::Any;
                }
                Ret::Submitted(String::new())
            }
            Op::Kill => {
                if self.id == Id::Unset {
                    return Ret::NoSuchApp;
                }
                self.killed = true;
                Ret::Killed
            }
            Op::Read => Ret::Seen(None),
        }
    }

    fn is_valid_step(&mut self, op: &Op, ret: &Ret) -> bool {
        match (op, ret) {
            (Op::Submit, Ret::Submitted(id)) => match &self.id {
                Id::Unset | Id::Any => {
                    self.id = Id::Is(id.clone());
                    true
                }
                // A retried submission answered with the first one's id.
                Id::Is(x) => x == id,
            },
            (Op::Read, Ret::Seen(None)) => self.id == Id::Unset,
            (Op::Read, Ret::Seen(Some((id, state)))) => {
                match &self.id {
                    Id::Unset => return false,
                    Id::Any => self.id = Id::Is(id.clone()),
                    Id::Is(x) if x != id => return false,
                    Id::Is(_) => {}
                }
                if rank(*state) < self.rank
                    || self.final_state.is_some_and(|f| f != *state)
                    || (self.killed && !is_final(*state))
                {
                    return false;
                }
                self.rank = rank(*state);
                if is_final(*state) {
                    self.final_state = Some(*state);
                }
                true
            }
            (Op::Kill, Ret::Killed) => {
                if self.id == Id::Unset {
                    return false;
                }
                self.killed = true;
                true
            }
            (Op::Kill, Ret::NoSuchApp) => self.id == Id::Unset,
            _ => false,
        }
    }
}

/// What the check found: keys checked, operations, and each violation
/// with the key's whole history.
#[derive(Default)]
pub struct Verdict {
    pub keys: usize,
    pub ops: usize,
    pub violations: Vec<String>,
}

/// Checks each key's history for linearizability.
pub fn check(events: &[Event]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    let mut verdict = Verdict {
        keys: by_key.len(),
        ops: events.len(),
        violations: Vec::new(),
    };
    for (key, evs) in by_key {
        if let Err(why) = check_key(&evs) {
            let mut text = format!("{key}: {why}; its history:");
            let t0 = evs
                .iter()
                .map(|e| e.invoked)
                .min()
                .expect("a key has events");
            for e in &evs {
                let at = |t: Instant| t.duration_since(t0).as_secs_f64() * 1000.0;
                match &e.returned {
                    Some((t, r)) => text.push_str(&format!(
                        "\n  {:?} {:?} [{:.1} ms, {:.1} ms] -> {r:?}",
                        e.thread,
                        e.op,
                        at(e.invoked),
                        at(*t)
                    )),
                    None => text.push_str(&format!(
                        "\n  {:?} {:?} [{:.1} ms, ...] -> no answer",
                        e.thread,
                        e.op,
                        at(e.invoked)
                    )),
                }
            }
            verdict.violations.push(text);
        }
    }
    verdict
}

fn check_key(evs: &[&Event]) -> Result<(), String> {
    if let Some(e) = evs
        .iter()
        .find(|e| matches!(e.returned, Some((_, Ret::Many(_)))))
    {
        return Err(format!(
            "a read found {:?}",
            e.returned.as_ref().map(|r| &r.1)
        ));
    }
    // Invocations and returns in real-time order (a return before an
    // invocation at the same instant: they did not overlap).
    let mut points: Vec<(Instant, u8, usize)> = Vec::new();
    for (i, e) in evs.iter().enumerate() {
        points.push((e.invoked, 1, i));
        if let Some((t, _)) = &e.returned {
            points.push((*t, 0, i));
        }
    }
    points.sort();
    let mut tester = LinearizabilityTester::new(App::default());
    for (_, kind, i) in points {
        let e = evs[i];
        let step = if kind == 1 {
            tester.on_invoke(e.thread, e.op.clone()).map(|_| ())
        } else {
            let ret = e.returned.as_ref().expect("a return point").1.clone();
            tester.on_return(e.thread, ret).map(|_| ())
        };
        step.map_err(|e| format!("not a well-formed history: {e}"))?;
    }
    if tester.is_consistent() {
        Ok(())
    } else {
        Err("not linearizable".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Events from (thread, op, invoked ms, returned ms or none, ret).
    fn history(ops: &[(u32, Op, u64, Option<u64>, Ret)]) -> Vec<Event> {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        ops.iter()
            .map(|(t, op, inv, ret_at, ret)| Event {
                key: "job".into(),
                thread: (*t, 0),
                op: op.clone(),
                invoked: at(*inv),
                returned: ret_at.map(|r| (at(r), ret.clone())),
            })
            .collect()
    }

    fn seen(id: &str, state: i32) -> Ret {
        Ret::Seen(Some((id.into(), state)))
    }

    #[test]
    fn a_read_after_an_acknowledged_submission_must_see_it() {
        let ok = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 11, Some(20), seen("a1", 1)),
        ]);
        assert!(check(&ok).violations.is_empty());
        let lost = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 11, Some(20), Ret::Seen(None)),
        ]);
        let v = check(&lost);
        assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
        assert!(v.violations[0].contains("not linearizable"));
        // Concurrent with the submission, either answer is right.
        let racing = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 5, Some(8), Ret::Seen(None)),
            (3, Op::Read, 6, Some(9), seen("a1", 1)),
        ]);
        assert!(check(&racing).violations.is_empty());
    }

    #[test]
    fn a_stale_read_is_caught() {
        // Running seen, then a later read sees it accepted: a stale replica.
        let stale = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 20, Some(30), seen("a1", 3)),
            (3, Op::Read, 31, Some(40), seen("a1", 2)),
        ]);
        assert_eq!(check(&stale).violations.len(), 1);
        // Overlapping reads may see either order.
        let overlapping = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 20, Some(35), seen("a1", 3)),
            (3, Op::Read, 30, Some(40), seen("a1", 2)),
        ]);
        assert!(check(&overlapping).violations.is_empty());
        // After an acknowledged kill, nothing but a final state; and a final
        // state never changes.
        let after_kill = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (1, Op::Kill, 11, Some(20), Ret::Killed),
            (2, Op::Read, 21, Some(30), seen("a1", 3)),
        ]);
        assert_eq!(check(&after_kill).violations.len(), 1);
        let changed = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 21, Some(30), seen("a1", 4)),
            (2, Op::Read, 31, Some(40), seen("a1", 6)),
        ]);
        assert_eq!(check(&changed).violations.len(), 1);
    }

    #[test]
    fn an_unanswered_submission_may_or_may_not_have_happened() {
        let took_effect = history(&[
            (1, Op::Submit, 0, None, Ret::Seen(None)),
            (2, Op::Read, 20, Some(30), Ret::Seen(None)),
            (2, Op::Read, 40, Some(50), seen("a7", 1)),
        ]);
        assert!(check(&took_effect).violations.is_empty());
        // But once seen, it cannot vanish.
        let vanished = history(&[
            (1, Op::Submit, 0, None, Ret::Seen(None)),
            (2, Op::Read, 40, Some(50), seen("a7", 1)),
            (2, Op::Read, 60, Some(70), Ret::Seen(None)),
        ]);
        assert_eq!(check(&vanished).violations.len(), 1);
        // Two applications under one name: a duplicate.
        let twice = history(&[
            (1, Op::Submit, 0, Some(10), Ret::Submitted("a1".into())),
            (2, Op::Read, 20, Some(30), Ret::Many(2)),
        ]);
        assert!(check(&twice).violations[0].contains("Many(2)"));
    }
}
