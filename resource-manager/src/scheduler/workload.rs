//! Synthetic clusters and ask streams for benchmarks and simulations:
//! deterministic (a seeded xorshift generator), shaped like ML clusters.

use super::model::{Ask, GpuAsk, Node, Placement};
use super::queues::Queues;
use super::Res;

const GIB: u64 = 1 << 30;

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// `n` nodes: `gpu_fraction` of them GPU nodes (8 GPUs, H100 or A100, 96
/// cores, 1 TiB), the rest CPU nodes of 32 to 96 cores and 128 to 512 GiB.
pub fn cluster(n: usize, gpu_fraction: f64, rng: &mut Rng) -> Vec<Node> {
    (0..n)
        .map(|i| {
            if rng.chance(gpu_fraction) {
                let (model, mem) = if rng.chance(0.5) {
                    ("H100", 80 * GIB)
                } else {
                    ("A100", 40 * GIB)
                };
                Node::new(&format!("gpu-{i}"), 96_000, 1024 * GIB)
                    .with_gpus(8, model, mem)
                    .with_label("gpu", &model.to_lowercase())
            } else {
                let cores = [32u64, 48, 64, 96][rng.below(4) as usize];
                Node::new(&format!("cpu-{i}"), cores * 1000, cores * 4 * GIB)
            }
        })
        .collect()
}

/// Leaf queues `root.q0..` with guarantees splitting the cluster by `weights`.
pub fn queues(total: Res, weights: &[u64]) -> Queues {
    let mut q = Queues::root_only();
    let sum: u64 = weights.iter().sum::<u64>().max(1);
    for (i, w) in weights.iter().enumerate() {
        let g = Res::new(
            total.vcores / sum * w,
            total.memory / sum * w,
            total.gpu_milli / sum * w,
        );
        q.add(&format!("root.q{i}"), g, Res::UNLIMITED, 1)
            .expect("generated queues are valid");
    }
    q
}

/// `n` asks spread over leaf queues `1..=queues`: `gpu_fraction` ask GPUs
/// (whole 1, 2, 4 or 8, or a quarter/half share), `gang_fraction` belong to
/// gangs of 4 to 16 (distributed training), the rest are 0.5 to 16 cores
/// with 1 to 64 GiB.
pub fn asks(
    n: usize,
    queues: usize,
    gpu_fraction: f64,
    gang_fraction: f64,
    rng: &mut Rng,
) -> Vec<Ask> {
    let mut out = Vec::with_capacity(n);
    let mut gang_id = 0u64;
    while out.len() < n {
        let id = out.len() as u64;
        let queue = 1 + rng.below(queues as u64) as usize;
        if rng.chance(gang_fraction) {
            gang_id += 1;
            let size = 4 + rng.below(13) as usize;
            let gpus = rng.chance(0.5);
            for k in 0..size.min(n - out.len()) {
                let mut a = Ask::new(id + k as u64, queue, 4000, 32 * GIB);
                a.gang = Some(gang_id);
                if gpus {
                    a.gpu = GpuAsk::Whole(1);
                }
                a.placement = if k == 0 {
                    Placement::Spread
                } else {
                    Placement::Pack
                };
                out.push(a);
            }
            continue;
        }
        let mut a = Ask::new(
            id,
            queue,
            500 * (1 + rng.below(32)),
            GIB * (1 + rng.below(64)),
        );
        if rng.chance(gpu_fraction) {
            a.gpu = match rng.below(6) {
                0 => GpuAsk::Share {
                    milli: 250,
                    memory: 10 * GIB,
                },
                1 => GpuAsk::Share {
                    milli: 500,
                    memory: 20 * GIB,
                },
                2 => GpuAsk::Whole(1),
                3 => GpuAsk::Whole(2),
                4 => GpuAsk::Whole(4),
                _ => GpuAsk::Whole(8),
            };
        }
        a.priority = rng.below(3) as i32;
        out.push(a);
    }
    out
}
