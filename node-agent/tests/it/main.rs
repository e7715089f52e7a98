//! Integration tests of the node agent: real processes, real cgroups (as root),
//! real gRPC on loopback. One binary; every test starts its own agent with its
//! own cgroup parent and checks at the end that nothing is left behind.

mod harness;

mod binary;
mod enforcement;
mod lifecycle;
mod local_socket;
mod logs;
mod metrics;
mod nvml;
mod requests;
mod tracker;
mod users;
