//! The leader's lifecycle (nomad's `leader.go`): the raft thread publishes
//! this member's role on a watch; on election the supervisor starts every
//! leader-only task together (the scheduling loop with the master launcher
//! and queue seeding, node liveness with container pruning), and on
//! step-down it stops them together and drops what they kept in memory, so
//! a later leadership starts clean. Nothing polls `is_leader`.

pub mod liveness;
pub mod scheduling;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::service::RmService;

/// Runs until `cancel` fires (or the raft thread is gone).
pub async fn supervise(svc: RmService, cancel: CancellationToken) {
    let mut role = svc.raft().leadership();
    loop {
        // Wait to be elected.
        let term = loop {
            let now = *role.borrow_and_update();
            if now.is_leader {
                break now.term;
            }
            tokio::select! {
                r = role.changed() => if r.is_err() { return },
                _ = cancel.cancelled() => return,
            }
        };
        info!(term, "elected: leader tasks starting");
        let tasks = cancel.child_token();
        let scheduling = tokio::spawn(svc.scheduling.clone().run(tasks.clone()));
        let liveness = tokio::spawn(svc.clone().run_liveness(tasks.clone()));
        // Lead until the role (or the term) changes.
        let gone = loop {
            tokio::select! {
                r = role.changed() => {
                    if r.is_err() {
                        break true;
                    }
                    let now = *role.borrow_and_update();
                    if !now.is_leader || now.term != term {
                        break false;
                    }
                }
                _ = cancel.cancelled() => break true,
            }
        };
        tasks.cancel();
        let _ = scheduling.await;
        let _ = liveness.await;
        svc.scheduling.step_down();
        svc.forget_heartbeats();
        info!(term, "stepped down: leader tasks stopped");
        if gone {
            return;
        }
    }
}
