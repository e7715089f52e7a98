//! GPU discovery and per-process GPU memory, behind [`GpuProbe`]: NVML in
//! production, a configured fake where no GPU exists.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::config::FakeGpuConfig;
use crate::error::{Error, Result};

/// One GPU as discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: u32,
    /// Minor number of its device file, `/dev/nvidia<minor>` (major 195):
    /// NVML's index order need not be the device files' order.
    pub minor: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
}

/// GPU memory one process uses on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcessUsage {
    pub pid: u32,
    pub uuid: String,
    pub used_bytes: u64,
}

/// Source of GPU facts. Calls may block (NVML does): call from a blocking thread.
pub trait GpuProbe: Send + Sync + 'static {
    /// Name shown in logs ("nvml", "fake", "none").
    fn name(&self) -> &'static str;
    /// The node's GPUs in index order.
    fn devices(&self) -> Vec<GpuInfo>;
    /// GPU memory used by every process on every device.
    fn process_usage(&self) -> Result<Vec<GpuProcessUsage>>;
}

/// A node without GPUs.
pub struct NoGpus;

impl GpuProbe for NoGpus {
    fn name(&self) -> &'static str {
        "none"
    }
    fn devices(&self) -> Vec<GpuInfo> {
        Vec::new()
    }
    fn process_usage(&self) -> Result<Vec<GpuProcessUsage>> {
        Ok(Vec::new())
    }
}

/// NVIDIA GPUs through NVML (libnvidia-ml, loaded at run time).
pub struct NvmlProbe {
    nvml: nvml_wrapper::Nvml,
    devices: Vec<GpuInfo>,
}

impl NvmlProbe {
    /// Initialises NVML and lists the devices. Fails when the driver or its
    /// library is missing; the caller then runs without GPUs.
    pub fn new() -> Result<Self> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| Error::Gpu(format!("NVML init: {e}")))?;
        let count = nvml
            .device_count()
            .map_err(|e| Error::Gpu(format!("NVML device count: {e}")))?;
        let mut devices = Vec::with_capacity(count as usize);
        for i in 0..count {
            let d = nvml
                .device_by_index(i)
                .map_err(|e| Error::Gpu(format!("NVML device {i}: {e}")))?;
            let err = |what: &str, e: nvml_wrapper::error::NvmlError| {
                Error::Gpu(format!("NVML device {i} {what}: {e}"))
            };
            devices.push(GpuInfo {
                index: d.index().map_err(|e| err("index", e))?,
                minor: d.minor_number().map_err(|e| err("minor number", e))?,
                uuid: d.uuid().map_err(|e| err("uuid", e))?,
                model: d.name().map_err(|e| err("name", e))?,
                memory_bytes: d.memory_info().map_err(|e| err("memory", e))?.total,
            });
        }
        Ok(NvmlProbe { nvml, devices })
    }
}

impl GpuProbe for NvmlProbe {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn devices(&self) -> Vec<GpuInfo> {
        self.devices.clone()
    }

    fn process_usage(&self) -> Result<Vec<GpuProcessUsage>> {
        use nvml_wrapper::enums::device::UsedGpuMemory;
        let mut out = Vec::new();
        for g in &self.devices {
            let d = self
                .nvml
                .device_by_uuid(g.uuid.as_str())
                .map_err(|e| Error::Gpu(format!("NVML device {}: {e}", g.uuid)))?;
            let mut procs = d
                .running_compute_processes()
                .map_err(|e| Error::Gpu(format!("NVML compute processes on {}: {e}", g.uuid)))?;
            // Graphics contexts hold memory too; a device without them errors,
            // which only means none.
            procs.extend(d.running_graphics_processes().unwrap_or_default());
            for p in procs {
                if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
                    out.push(GpuProcessUsage {
                        pid: p.pid,
                        uuid: g.uuid.clone(),
                        used_bytes: bytes,
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Configured fake GPUs (see [`FakeGpuConfig`]).
pub struct FakeGpuProbe {
    devices: Vec<GpuInfo>,
    usage_dir: Option<PathBuf>,
}

impl FakeGpuProbe {
    pub fn new(cfg: &FakeGpuConfig) -> Self {
        let devices = cfg
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| GpuInfo {
                index: i as u32,
                minor: d.minor.unwrap_or(i as u32),
                uuid: d.uuid.clone(),
                model: d.model.clone(),
                memory_bytes: d.memory.as_u64(),
            })
            .collect();
        FakeGpuProbe {
            devices,
            usage_dir: cfg.usage_dir.clone(),
        }
    }
}

impl GpuProbe for FakeGpuProbe {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn devices(&self) -> Vec<GpuInfo> {
        self.devices.clone()
    }

    fn process_usage(&self) -> Result<Vec<GpuProcessUsage>> {
        let Some(dir) = &self.usage_dir else {
            return Ok(Vec::new());
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("reading fake GPU usage", dir, e)),
        };
        let known: HashMap<&str, ()> = self.devices.iter().map(|d| (d.uuid.as_str(), ())).collect();
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // Like NVML, only live processes hold GPU memory.
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in text.lines() {
                let mut it = line.split_whitespace();
                if let (Some(uuid), Some(bytes)) =
                    (it.next(), it.next().and_then(|b| b.parse().ok()))
                {
                    if known.contains_key(uuid) {
                        out.push(GpuProcessUsage {
                            pid,
                            uuid: uuid.to_string(),
                            used_bytes: bytes,
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Environment that makes exactly `uuids` visible to CUDA programs. Devices are
/// named by UUID, so NVML's and CUDA's differing index orders cannot mix them up.
pub fn visibility_env(uuids: &[String]) -> Vec<(String, String)> {
    let list = if uuids.is_empty() {
        // An empty CUDA_VISIBLE_DEVICES hides every device; "void" does so for
        // the NVIDIA container runtime.
        (String::new(), "void".to_string())
    } else {
        (uuids.join(","), uuids.join(","))
    };
    vec![
        ("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into()),
        ("CUDA_VISIBLE_DEVICES".into(), list.0),
        ("NVIDIA_VISIBLE_DEVICES".into(), list.1),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FakeGpuDevice;

    #[test]
    fn fake_reads_usage_of_live_pids_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FakeGpuConfig {
            devices: vec![
                FakeGpuDevice {
                    uuid: "GPU-a".into(),
                    model: "Fake".into(),
                    memory: bytesize::ByteSize::gib(16),
                    minor: None,
                },
                FakeGpuDevice {
                    uuid: "GPU-b".into(),
                    model: "Fake".into(),
                    memory: bytesize::ByteSize::gib(16),
                    minor: Some(7),
                },
            ],
            usage_dir: Some(dir.path().to_path_buf()),
        };
        let me = std::process::id();
        std::fs::write(dir.path().join(me.to_string()), "GPU-b 1000\nGPU-zzz 5\n").unwrap();
        // A pid that cannot exist.
        std::fs::write(dir.path().join("4194304999"), "GPU-a 7\n").unwrap();
        let p = FakeGpuProbe::new(&cfg);
        assert_eq!(p.devices()[1].index, 1);
        assert_eq!(p.devices()[0].minor, 0);
        assert_eq!(p.devices()[1].minor, 7);
        let u = p.process_usage().unwrap();
        assert_eq!(
            u,
            vec![GpuProcessUsage {
                pid: me,
                uuid: "GPU-b".into(),
                used_bytes: 1000
            }]
        );
    }

    #[test]
    fn visibility_by_uuid() {
        let env = visibility_env(&["GPU-1".into(), "GPU-2".into()]);
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "GPU-1,GPU-2".into())));
        assert!(env.contains(&("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into())));
        let none = visibility_env(&[]);
        assert!(none.contains(&("CUDA_VISIBLE_DEVICES".into(), String::new())));
        assert!(none.contains(&("NVIDIA_VISIBLE_DEVICES".into(), "void".into())));
    }
}
