//! Device filtering on cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program
//! attached to a container's group, denying the character devices it was not
//! given (the node's other GPUs). cgroup v2 has no devices controller; the
//! kernel asks the programs attached to the group and its ancestors instead.
//!
//! A minimal loader over the `bpf(2)` system call: the program is a few
//! instructions assembled here (no compiler, no object file), loaded, attached
//! with `BPF_F_ALLOW_MULTI` (so it composes with programs an init system put
//! on the ancestors: every one must allow) and released; the attachment keeps
//! it alive until the group is removed.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::error::{Error, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// `bpf_cgroup_dev_ctx.access_type & 0xffff` for a character device.
const BPF_DEVCG_DEV_CHAR: i32 = 2;

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst in the low nibble, src in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }
    /// `dst = *(u32 *)(src + off)`
    const fn load_u32(dst: u8, src: u8, off: i16) -> Self {
        Self::new(0x61, dst, src, off, 0) // BPF_LDX | BPF_MEM | BPF_W
    }
    /// `dst &= imm` (32-bit)
    const fn and32(dst: u8, imm: i32) -> Self {
        Self::new(0x54, dst, 0, 0, imm) // BPF_ALU | BPF_AND | BPF_K
    }
    /// `if dst != imm goto pc + 1 + off`
    const fn jne(dst: u8, imm: i32, off: i16) -> Self {
        Self::new(0x55, dst, 0, off, imm) // BPF_JMP | BPF_JNE | BPF_K
    }
    /// `dst = imm`
    const fn mov(dst: u8, imm: i32) -> Self {
        Self::new(0xb7, dst, 0, 0, imm) // BPF_ALU64 | BPF_MOV | BPF_K
    }
    const fn exit() -> Self {
        Self::new(0x95, 0, 0, 0, 0) // BPF_JMP | BPF_EXIT
    }
}

/// The program: deny every access to the character devices `denied`
/// (major, minor), allow everything else. `r1` points at
/// `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`.
pub fn deny_program(denied: &[(u32, u32)]) -> Vec<Insn> {
    let mut p = vec![
        Insn::load_u32(2, 1, 0),
        Insn::and32(2, 0xffff),
        Insn::load_u32(3, 1, 4),
        Insn::load_u32(4, 1, 8),
    ];
    for &(major, minor) in denied {
        // Majors are 12 bits and minors 20: both fit an imm without sign trouble.
        p.extend([
            Insn::jne(2, BPF_DEVCG_DEV_CHAR, 4),
            Insn::jne(3, major as i32, 3),
            Insn::jne(4, minor as i32, 2),
            Insn::mov(0, 0),
            Insn::exit(),
        ]);
    }
    p.extend([Insn::mov(0, 1), Insn::exit()]);
    p
}

/// `union bpf_attr` as BPF_PROG_LOAD reads it, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as BPF_PROG_ATTACH reads it.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, initialised #[repr(C)] bpf_attr prefix of the
    // size passed; the kernel reads (and for PROG_LOAD's log, writes through
    // pointers it holds, which the caller keeps alive) no more than that.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads the program that denies `denied`; the verifier's log is in the error.
pub fn load(denied: &[(u32, u32)]) -> Result<OwnedFd> {
    let insns = deny_program(denied);
    let license = CString::new("Apache-2.0").expect("no NUL");
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"weft_device");
    let attempt = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_CGROUP_DEVICE,
            ..Default::default()
        };
        if let Some(log) = log {
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        sys_bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(None) {
        // SAFETY: a successful PROG_LOAD returns a new descriptor we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 16 * 1024];
            let _ = attempt(Some(&mut log));
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let why = String::from_utf8_lossy(&log[..end]).trim().to_string();
            Err(Error::FailedPrecondition(if why.is_empty() {
                format!("loading the cgroup device program: {e}")
            } else {
                format!("loading the cgroup device program: {e}: {why}")
            }))
        }
    }
}

/// Attaches a device program denying `denied` to the cgroup v2 directory `dir`.
pub fn attach_deny(dir: &Path, denied: &[(u32, u32)]) -> Result<()> {
    let prog = load(denied)?;
    let cgroup = std::fs::File::open(dir).map_err(|e| Error::io("opening", dir, e))?;
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_ATTACH, &mut attr).map_err(|e| {
        Error::FailedPrecondition(format!(
            "attaching the device program to {}: {e}",
            dir.display()
        ))
    })?;
    Ok(())
}

/// Whether this kernel and these rights allow device programs: loads one and
/// drops it. The reason when not.
pub fn probe() -> std::result::Result<(), String> {
    load(&[(195, 0)]).map(drop).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_shape() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::size_of::<ProgAttachAttr>(), 20);
        let p = deny_program(&[(195, 0), (195, 3)]);
        assert_eq!(p.len(), 4 + 2 * 5 + 2);
        // Each skip lands on the next rule's first instruction, the last on
        // the final allow.
        assert_eq!(p[4], Insn::jne(2, 2, 4));
        assert_eq!(p[5], Insn::jne(3, 195, 3));
        assert_eq!(p[6], Insn::jne(4, 0, 2));
        assert_eq!(p[11], Insn::jne(4, 3, 2));
        assert_eq!(p[14], Insn::mov(0, 1));
        assert_eq!(p[15], Insn::exit());
        assert_eq!(Insn::jne(4, 3, 2).regs, 0x04);
        assert_eq!(Insn::load_u32(2, 1, 0).regs, 0x12);
        // Nothing denied: allow all.
        assert_eq!(deny_program(&[]).len(), 6);
    }
}
