//! Queues: a hierarchy (`root.research.vision`) with guaranteed and maximum
//! shares, per-user limits, submit ACLs and weights; usage accounting; and
//! the fairness order between leaf queues.
//!
//! Between leaf queues the order is dominant resource fairness measured
//! against guarantees: a queue whose dominant share is under its guaranteed
//! dominant share goes first (the most under-served relative to its guarantee
//! first); then the others by dominant share divided by weight. Maxima and
//! user limits are enforced at the leaf and at every ancestor.

use std::collections::HashMap;

use super::model::Res;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConf {
    pub name: String,
    pub parent: Option<usize>,
    pub guaranteed: Res,
    pub maximum: Res,
    pub weight: u32,
    /// Most one user may use in this queue.
    pub user_limit: Res,
    /// Users allowed to submit; empty = everyone.
    pub submit_acl: Vec<String>,
}

/// The queue tree and what each queue (and user) uses.
#[derive(Debug, Clone, Default)]
pub struct Queues {
    pub confs: Vec<QueueConf>,
    pub usage: Vec<Res>,
    /// queue -> user -> usage (looked up by `&str`: no allocation per ask).
    user_usage: HashMap<usize, HashMap<String, Res>>,
    children: Vec<usize>,
}

impl Queues {
    /// A tree with only `root` (unlimited).
    pub fn root_only() -> Queues {
        let mut q = Queues::default();
        q.add("root", Res::ZERO, Res::UNLIMITED, 1)
            .expect("root is valid");
        q
    }

    /// The tree of replicated queue specs (`root` first, parents before
    /// children); an empty list is `root` alone.
    pub fn from_specs(specs: &[crate::fsm::QueueSpec]) -> Result<Queues, String> {
        if specs.is_empty() {
            return Ok(Queues::root_only());
        }
        let mut q = Queues::default();
        let or_max = |v: u64| if v == 0 { u64::MAX } else { v };
        for s in specs {
            let i = q.add(
                &s.name,
                Res::new(
                    s.guaranteed_vcores_milli,
                    s.guaranteed_memory_bytes,
                    1000 * s.guaranteed_gpus as u64,
                ),
                Res::new(
                    or_max(s.max_vcores_milli),
                    or_max(s.max_memory_bytes),
                    or_max(1000 * s.max_gpus as u64),
                ),
                s.weight,
            )?;
            q.confs[i].submit_acl = s.submit_acl.clone();
            q.confs[i].user_limit = Res::new(
                or_max(s.user_limit_vcores_milli),
                or_max(s.user_limit_memory_bytes),
                or_max(1000 * s.user_limit_gpus as u64),
            );
        }
        if q.index("root") != Some(0) {
            return Err("queues.name: root must come first".into());
        }
        Ok(q)
    }

    /// Adds queue `name` (its parent, the name minus its last `.part`, must
    /// exist). Returns its index.
    pub fn add(
        &mut self,
        name: &str,
        guaranteed: Res,
        maximum: Res,
        weight: u32,
    ) -> Result<usize, String> {
        if self.index(name).is_some() {
            return Err(format!("queues.name: {name} appears twice"));
        }
        let parent = match name.rsplit_once('.') {
            None if name == "root" => None,
            None => {
                return Err(format!(
                    "queues.name: {name:?} must be root or under root (root.x)"
                ))
            }
            Some((p, _)) => Some(self.index(p).ok_or_else(|| {
                format!("queues.name: parent {p} of {name} is not defined (define parents first)")
            })?),
        };
        if weight == 0 {
            return Err(format!("queues.weight: {name} needs a weight above 0"));
        }
        if !guaranteed.fits_in(maximum) {
            return Err(format!(
                "queues.guaranteed: {name} guarantees more than its maximum"
            ));
        }
        self.confs.push(QueueConf {
            name: name.to_string(),
            parent,
            guaranteed,
            maximum,
            weight,
            user_limit: Res::UNLIMITED,
            submit_acl: Vec::new(),
        });
        self.usage.push(Res::ZERO);
        self.children.push(0);
        if let Some(p) = parent {
            self.children[p] += 1;
        }
        Ok(self.confs.len() - 1)
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.confs.iter().position(|q| q.name == name)
    }

    pub fn is_leaf(&self, q: usize) -> bool {
        self.children[q] == 0
    }

    pub(crate) fn chain(&self, q: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(q), move |&i| self.confs[i].parent)
    }

    /// Whether `user` may take `res` more in leaf `q` without passing a
    /// maximum (of `q` or an ancestor) or the user limit.
    pub fn can_take(&self, q: usize, user: &str, res: Res) -> bool {
        if self
            .chain(q)
            .any(|i| !self.usage[i].plus(res).fits_in(self.confs[i].maximum))
        {
            return false;
        }
        if self.confs[q].user_limit == Res::UNLIMITED {
            return true;
        }
        let used = self
            .user_usage
            .get(&q)
            .and_then(|users| users.get(user))
            .copied()
            .unwrap_or_default();
        used.plus(res).fits_in(self.confs[q].user_limit)
    }

    /// What `user` uses in leaf `q`.
    pub fn user_used(&self, q: usize, user: &str) -> Res {
        self.user_usage
            .get(&q)
            .and_then(|users| users.get(user))
            .copied()
            .unwrap_or_default()
    }

    pub fn charge(&mut self, q: usize, user: &str, res: Res) {
        let mut i = Some(q);
        while let Some(k) = i {
            self.usage[k] = self.usage[k].plus(res);
            i = self.confs[k].parent;
        }
        let users = self.user_usage.entry(q).or_default();
        match users.get_mut(user) {
            Some(u) => *u = u.plus(res),
            None => {
                users.insert(user.to_string(), res);
            }
        }
    }

    pub fn refund(&mut self, q: usize, user: &str, res: Res) {
        let chain: Vec<usize> = self.chain(q).collect();
        for i in chain {
            self.usage[i] = self.usage[i].minus(res);
        }
        if let Some(u) = self
            .user_usage
            .get_mut(&q)
            .and_then(|users| users.get_mut(user))
        {
            *u = u.minus(res);
        }
    }

    /// The smallest maximum along `q`'s chain (what one ask can ever get).
    pub fn effective_maximum(&self, q: usize) -> Res {
        self.chain(q).fold(self.confs[q].user_limit, |m, i| {
            let x = self.confs[i].maximum;
            Res::new(
                m.vcores.min(x.vcores),
                m.memory.min(x.memory),
                m.gpu_milli.min(x.gpu_milli),
            )
        })
    }

    /// Lower goes first: (0 if under its guarantee else 1, then the share).
    pub fn fairness_key(&self, q: usize, cluster: Res) -> (u8, f64) {
        let c = &self.confs[q];
        let ds = self.usage[q].dominant_share(cluster);
        let gs = c.guaranteed.dominant_share(cluster);
        if gs > 0.0 && ds < gs {
            (0, ds / gs)
        } else {
            (1, ds / c.weight as f64)
        }
    }

    /// Whether leaf `q`, using `more` on top of what it uses, stays within
    /// its guarantee: its dominant share of `cluster` at most its
    /// guarantee's (the measure of [`Queues::fairness_key`]). False for a
    /// queue guaranteed nothing.
    pub fn within_guarantee(&self, q: usize, more: Res, cluster: Res) -> bool {
        let gs = self.confs[q].guaranteed.dominant_share(cluster);
        gs > 0.0 && self.usage[q].plus(more).dominant_share(cluster) <= gs + 1e-9
    }

    /// Whether leaf `q`, without `less` of what it uses, still runs above
    /// its guarantee (by dominant share, as [`Queues::within_guarantee`]).
    pub fn above_guarantee(&self, q: usize, less: Res, cluster: Res) -> bool {
        let gs = self.confs[q].guaranteed.dominant_share(cluster);
        self.usage[q].minus(less).dominant_share(cluster) > gs + 1e-9
    }

    /// Whether `user` may submit to `q` (the ACL of `q` and its ancestors).
    pub fn may_submit(&self, q: usize, user: &str) -> bool {
        self.chain(q).all(|i| {
            self.confs[i].submit_acl.is_empty()
                || self.confs[i].submit_acl.iter().any(|u| u == user)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchy_maxima_and_user_limits() {
        let mut q = Queues::root_only();
        let research = q
            .add("root.research", Res::ZERO, Res::new(8000, 64, 4000), 1)
            .unwrap();
        let vision = q
            .add("root.research.vision", Res::ZERO, Res::UNLIMITED, 1)
            .unwrap();
        assert!(q
            .add("root.x.y", Res::ZERO, Res::UNLIMITED, 1)
            .unwrap_err()
            .contains("parent root.x"));
        assert!(q.add("other", Res::ZERO, Res::UNLIMITED, 1).is_err());
        assert!(!q.is_leaf(research));
        assert!(q.is_leaf(vision));
        // The parent's maximum binds the child.
        assert!(q.can_take(vision, "a", Res::new(8000, 64, 0)));
        assert!(!q.can_take(vision, "a", Res::new(8001, 1, 0)));
        q.charge(vision, "a", Res::new(6000, 10, 0));
        assert_eq!(q.usage[research], Res::new(6000, 10, 0));
        assert_eq!(q.usage[0], Res::new(6000, 10, 0));
        assert!(!q.can_take(vision, "b", Res::new(3000, 1, 0)));
        q.refund(vision, "a", Res::new(6000, 10, 0));
        assert_eq!(q.usage[0], Res::ZERO);
        q.confs[vision].user_limit = Res::new(1000, u64::MAX, u64::MAX);
        assert!(q.can_take(vision, "a", Res::new(1000, 1, 0)));
        q.charge(vision, "a", Res::new(1000, 1, 0));
        assert!(!q.can_take(vision, "a", Res::new(1, 1, 0)), "user limit");
        assert!(
            q.can_take(vision, "b", Res::new(1000, 1, 0)),
            "limits are per user"
        );
        assert_eq!(q.effective_maximum(vision).vcores, 1000);
    }

    #[test]
    fn under_guarantee_goes_first() {
        let cluster = Res::new(100_000, 1000, 0);
        let mut q = Queues::root_only();
        let a = q
            .add("root.a", Res::new(60_000, 600, 0), Res::UNLIMITED, 1)
            .unwrap();
        let b = q
            .add("root.b", Res::new(20_000, 200, 0), Res::UNLIMITED, 1)
            .unwrap();
        q.charge(a, "u", Res::new(30_000, 10, 0)); // half its guarantee
        q.charge(b, "u", Res::new(15_000, 10, 0)); // three quarters of its guarantee
        assert!(q.fairness_key(a, cluster) < q.fairness_key(b, cluster));
        q.charge(b, "u", Res::new(10_000, 10, 0)); // b over its guarantee
        assert_eq!(q.fairness_key(b, cluster).0, 1);
        assert!(q.fairness_key(a, cluster) < q.fairness_key(b, cluster));
    }

    #[test]
    fn acls_are_inherited() {
        let mut q = Queues::root_only();
        let t = q.add("root.team", Res::ZERO, Res::UNLIMITED, 1).unwrap();
        let s = q
            .add("root.team.sub", Res::ZERO, Res::UNLIMITED, 1)
            .unwrap();
        q.confs[t].submit_acl = vec!["ann".into()];
        assert!(q.may_submit(s, "ann"));
        assert!(!q.may_submit(s, "bob"));
    }
}
