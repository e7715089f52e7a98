//! What the node offers: discovered with sysinfo, minus the reserved amounts,
//! unless the config names the figures outright.

use crate::config::ResourcesConfig;
use crate::error::{Error, Result};

/// Schedulable capacity of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub vcores_milli: u64,
    pub memory_bytes: u64,
}

/// The machine as sysinfo sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    pub logical_cpus: u64,
    pub memory_bytes: u64,
}

impl HostFacts {
    pub fn discover() -> Result<Self> {
        let mut sys = sysinfo::System::new().map_err(|e| Error::Config(format!("sysinfo: {e}")))?;
        sys.refresh_memory();
        sys.refresh_cpu_list(sysinfo::CpuRefreshKind::nothing());
        Ok(HostFacts {
            logical_cpus: sys.cpus().len().max(1) as u64,
            memory_bytes: sys.total_memory(),
        })
    }
}

/// Capacity from host facts and config: an override wins, else discovered
/// minus reserved (never below zero).
pub fn compute(host: HostFacts, cfg: &ResourcesConfig) -> Capacity {
    let vcores_milli = match cfg.vcores {
        Some(v) => (v * 1000.0).round() as u64,
        None => {
            (host.logical_cpus * 1000).saturating_sub((cfg.reserved_vcores * 1000.0).round() as u64)
        }
    };
    let memory_bytes = match cfg.memory {
        Some(m) => m.as_u64(),
        None => host
            .memory_bytes
            .saturating_sub(cfg.reserved_memory.as_u64()),
    };
    Capacity {
        vcores_milli,
        memory_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;

    #[test]
    fn reserved_and_overrides() {
        let host = HostFacts {
            logical_cpus: 8,
            memory_bytes: 32 << 30,
        };
        let mut cfg = ResourcesConfig {
            reserved_vcores: 1.5,
            reserved_memory: ByteSize::gib(2),
            ..Default::default()
        };
        assert_eq!(
            compute(host, &cfg),
            Capacity {
                vcores_milli: 6500,
                memory_bytes: 30 << 30
            }
        );
        cfg.vcores = Some(2.0);
        cfg.memory = Some(ByteSize::gib(4));
        assert_eq!(
            compute(host, &cfg),
            Capacity {
                vcores_milli: 2000,
                memory_bytes: 4 << 30
            }
        );
        cfg.vcores = None;
        cfg.reserved_vcores = 100.0;
        assert_eq!(compute(host, &cfg).vcores_milli, 0);
    }

    #[test]
    fn discovers_this_machine() {
        let h = HostFacts::discover().unwrap();
        assert!(h.logical_cpus >= 1);
        assert!(h.memory_bytes > 64 << 20);
    }
}
