//! Integration tests of the resource manager: real `resource-manager`
//! processes forming a Raft group on loopback, killed with SIGKILL and
//! restarted, driven through the client library.

mod cluster;
mod secure;

mod acl;
mod apps;
mod disk;
mod failover;
mod fence;
mod membership;
mod nodes;
mod preemption;
mod queues;
mod rest;
mod retention;
mod rmctl;
mod scheduling;
mod services;
mod standalone;
mod tls;
mod ui;
