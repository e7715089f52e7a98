//! The scheduler's model: resources, nodes with per-device GPU accounting,
//! asks, queues. Plain data, no I/O.

/// An amount of compute. GPUs count in thousandths of a device
/// (1000 = one whole GPU), so whole and fractional asks share one measure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Res {
    pub vcores: u64,
    pub memory: u64,
    pub gpu_milli: u64,
}

impl Res {
    pub const ZERO: Res = Res {
        vcores: 0,
        memory: 0,
        gpu_milli: 0,
    };
    /// No limit.
    pub const UNLIMITED: Res = Res {
        vcores: u64::MAX,
        memory: u64::MAX,
        gpu_milli: u64::MAX,
    };

    pub fn new(vcores: u64, memory: u64, gpu_milli: u64) -> Res {
        Res {
            vcores,
            memory,
            gpu_milli,
        }
    }

    /// Component-wise sum, saturating.
    pub fn plus(self, o: Res) -> Res {
        Res {
            vcores: self.vcores.saturating_add(o.vcores),
            memory: self.memory.saturating_add(o.memory),
            gpu_milli: self.gpu_milli.saturating_add(o.gpu_milli),
        }
    }

    /// Component-wise difference, saturating at zero.
    pub fn minus(self, o: Res) -> Res {
        Res {
            vcores: self.vcores.saturating_sub(o.vcores),
            memory: self.memory.saturating_sub(o.memory),
            gpu_milli: self.gpu_milli.saturating_sub(o.gpu_milli),
        }
    }

    /// Every component of `self` is at most `o`'s.
    pub fn fits_in(self, o: Res) -> bool {
        self.vcores <= o.vcores && self.memory <= o.memory && self.gpu_milli <= o.gpu_milli
    }

    /// The largest share `self` takes of `of`, per resource (DRF's dominant
    /// share). Resources `of` lacks do not count.
    pub fn dominant_share(self, of: Res) -> f64 {
        let s = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        s(self.vcores, of.vcores)
            .max(s(self.memory, of.memory))
            .max(s(self.gpu_milli, of.gpu_milli))
    }
}

/// One GPU of a node, as the scheduler accounts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    pub model: String,
    pub memory: u64,
    /// Share of the device still free, in thousandths (1000 = untouched).
    pub free_milli: u32,
    /// Device memory not yet promised to fractional shares.
    pub free_memory: u64,
}

impl GpuSlot {
    pub fn new(model: &str, memory: u64) -> GpuSlot {
        GpuSlot {
            model: model.to_string(),
            memory,
            free_milli: 1000,
            free_memory: memory,
        }
    }

    pub fn is_whole_free(&self) -> bool {
        self.free_milli == 1000
    }
}

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub capacity_vcores: u64,
    pub capacity_memory: u64,
    pub free_vcores: u64,
    pub free_memory: u64,
    pub gpus: Vec<GpuSlot>,
    /// `key=value` labels, sorted.
    pub labels: Vec<(String, String)>,
    /// False for nodes not RUNNING (lost, draining...).
    pub schedulable: bool,
    /// Ports of its range still free (`u32::MAX`: not counted).
    pub free_ports: u32,
}

impl Node {
    pub fn new(name: &str, vcores: u64, memory: u64) -> Node {
        Node {
            name: name.to_string(),
            capacity_vcores: vcores,
            capacity_memory: memory,
            free_vcores: vcores,
            free_memory: memory,
            gpus: Vec::new(),
            labels: Vec::new(),
            schedulable: true,
            free_ports: u32::MAX,
        }
    }

    pub fn with_gpus(mut self, n: usize, model: &str, memory: u64) -> Node {
        self.gpus
            .extend((0..n).map(|_| GpuSlot::new(model, memory)));
        self
    }

    pub fn with_label(mut self, k: &str, v: &str) -> Node {
        self.labels.push((k.to_string(), v.to_string()));
        self.labels.sort();
        self
    }

    /// This node as it would be with nothing running on it.
    pub fn emptied(&self) -> Node {
        let mut n = self.clone();
        n.free_vcores = n.capacity_vcores;
        n.free_memory = n.capacity_memory;
        n.schedulable = true;
        for g in &mut n.gpus {
            g.free_milli = 1000;
            g.free_memory = g.memory;
        }
        n
    }

    pub fn capacity(&self) -> Res {
        Res::new(
            self.capacity_vcores,
            self.capacity_memory,
            1000 * self.gpus.len() as u64,
        )
    }

    pub fn whole_free_gpus(&self) -> u32 {
        self.gpus.iter().filter(|g| g.is_whole_free()).count() as u32
    }

    pub fn has_labels(&self, want: &[(String, String)]) -> bool {
        want.iter().all(|w| self.labels.iter().any(|l| l == w))
    }
}

/// What GPUs an ask needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuAsk {
    None,
    /// Whole, otherwise unused devices.
    Whole(u32),
    /// A share of one device (thousandths) with a GPU-memory quota.
    Share {
        milli: u32,
        memory: u64,
    },
}

impl GpuAsk {
    pub fn milli(self) -> u64 {
        match self {
            GpuAsk::None => 0,
            GpuAsk::Whole(n) => 1000 * n as u64,
            GpuAsk::Share { milli, .. } => milli as u64,
        }
    }
}

/// Where to put an ask among the nodes that fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Placement {
    /// Fill nodes and GPUs before opening new ones (keeps whole GPUs free).
    #[default]
    Pack,
    /// Across nodes (e.g. parameter servers).
    Spread,
}

/// One container wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub id: u64,
    /// Identity across rounds (0: `id`), so that a unit's wait for room
    /// is counted from round to round even when `id` (its index in one
    /// round's input) changes as other asks come and go.
    pub key: u64,
    /// Leaf queue index in [`Queues`](super::Queues).
    pub queue: usize,
    pub user: String,
    /// Higher first within a queue.
    pub priority: i32,
    /// Submission order within a queue (lower first).
    pub seq: u64,
    pub vcores: u64,
    pub memory: u64,
    pub gpu: GpuAsk,
    /// Required GPU model (exact), if any.
    pub gpu_model: Option<String>,
    /// Minimum memory of each GPU used.
    pub gpu_min_memory: u64,
    /// Node labels that must all be present.
    pub labels: Vec<(String, String)>,
    /// Asks with the same gang id are placed in one round or not at all.
    pub gang: Option<u64>,
    pub placement: Placement,
    /// Spread asks of one group (a service's stage) go to the nodes with
    /// the fewest of the group first (0: none; see [`Cluster::spread`]).
    ///
    /// [`Cluster::spread`]: super::Cluster::spread
    pub spread_group: u64,
    /// Ports of the node each container needs.
    pub ports: u32,
}

impl Ask {
    /// A plain ask: `vcores` thousandths of a core and `memory` bytes.
    pub fn new(id: u64, queue: usize, vcores: u64, memory: u64) -> Ask {
        Ask {
            id,
            key: 0,
            queue,
            user: "user".into(),
            priority: 0,
            seq: id,
            vcores,
            memory,
            gpu: GpuAsk::None,
            gpu_model: None,
            gpu_min_memory: 0,
            labels: Vec::new(),
            gang: None,
            placement: Placement::Pack,
            spread_group: 0,
            ports: 0,
        }
    }

    /// Its identity across rounds.
    pub fn unit_key(&self) -> u64 {
        if self.key == 0 {
            self.id
        } else {
            self.key
        }
    }

    pub fn res(&self) -> Res {
        Res::new(self.vcores, self.memory, self.gpu.milli())
    }
}

/// Where an ask went, and which GPUs (device index, share, memory) it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub ask: u64,
    pub node: usize,
    pub gpus: Vec<GpuGrant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuGrant {
    pub device: usize,
    pub milli: u32,
    pub memory: u64,
}
