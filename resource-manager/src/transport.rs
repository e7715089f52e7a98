//! Raft messages between members over gRPC (`RaftTransport.Send`, a client
//! stream per peer). raft-rs's own encoding travels as bytes.
//!
//! The raft thread never blocks on the network: [`Transport::send`] puts each
//! message into its peer's bounded queue with `try_send` (a full queue drops
//! it; raft retransmits). One task per peer keeps a stream open, reconnecting
//! with backoff, so a slow or dead peer holds up no one else.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;
use weft_proto::v1 as pb;
use weft_proto::v1::raft_transport_client::RaftTransportClient;

use crate::raft_node::RaftHandle;

/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE: usize = 4096;
/// Largest raft message (snapshots included) accepted or sent.
pub const MAX_MESSAGE: usize = 256 << 20;

/// Where the raft thread's outgoing messages go: the real gRPC
/// [`Transport`], or [`memory::MemoryNetwork`] for in-process tests (with
/// partitions). The raft thread calls it and never blocks on it.
pub trait Network: Send + 'static {
    /// Makes the peer set `members` (raft id -> address; this member's own
    /// entry is ignored).
    fn sync(&mut self, members: &BTreeMap<u64, String>);

    /// Hands `msgs` on for delivery (a message that cannot be delivered is
    /// dropped: raft retransmits). Returns, for every snapshot among them,
    /// its recipient and whether it was handed on (the raft thread reports
    /// each to raft, or the recipient's progress would wait on it forever).
    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, bool)>;
}

pub mod memory;

/// Outgoing side, owned by the raft thread.
pub struct Transport {
    me: u64,
    runtime: tokio::runtime::Handle,
    /// Peer id -> (address, queue of its sender task).
    peers: HashMap<u64, (String, mpsc::Sender<Message>)>,
}

impl Transport {
    /// A transport with no peers yet; [`Transport::sync`] adds them. Sender
    /// tasks run on `runtime`.
    pub fn start(me: u64, runtime: &tokio::runtime::Handle) -> Self {
        Transport {
            me,
            runtime: runtime.clone(),
            peers: HashMap::new(),
        }
    }
}

impl Network for Transport {
    /// Starts senders for new or moved peers, stops those of removed ones.
    fn sync(&mut self, members: &BTreeMap<u64, String>) {
        self.peers
            .retain(|id, (addr, _)| members.get(id).is_some_and(|a| a == addr));
        for (&id, addr) in members {
            if id == self.me || self.peers.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            self.runtime.spawn(peer_loop(self.me, id, addr.clone(), rx));
            self.peers.insert(id, (addr.clone(), tx));
        }
    }

    /// Queues each message for its peer's sender task (`try_send`: a full
    /// queue drops it).
    fn send(&self, msgs: Vec<Message>) -> Vec<(u64, bool)> {
        let mut snapshots = Vec::new();
        for m in msgs {
            let to = m.to;
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let queued = self
                .peers
                .get(&to)
                .is_some_and(|(_, q)| q.try_send(m).is_ok());
            if !queued {
                debug!(
                    peer = to,
                    "raft message dropped (peer queue full or unknown)"
                );
            }
            if is_snapshot {
                snapshots.push((to, queued));
            }
        }
        snapshots
    }
}

async fn peer_loop(from: u64, to: u64, addr: String, mut rx: mpsc::Receiver<Message>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Ok(ep) = weft_common::net::endpoint(
            &addr,
            weft_common::tls::Role::Rm,
            Duration::from_secs(1),
            None,
        ) else {
            tracing::error!(peer = to, address = %addr, "invalid peer address; raft messages to it are dropped");
            while rx.recv().await.is_some() {}
            return;
        };
        let channel = ep.connect_lazy();
        let mut client = RaftTransportClient::new(channel).max_encoding_message_size(MAX_MESSAGE);
        let (tx, stream_rx) = mpsc::channel::<pb::RaftEnvelope>(256);
        let mut call =
            tokio::spawn(async move { client.send(ReceiverStream::new(stream_rx)).await });
        let started = tokio::time::Instant::now();
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { call.abort(); return };
                    let env = pb::RaftEnvelope {
                        from,
                        to,
                        message: m.write_to_bytes().expect("raft messages encode"),
                    };
                    if tx.send(env).await.is_err() {
                        break;
                    }
                }
                _ = &mut call => break,
            }
        }
        call.abort();
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(50);
        }
        debug!(
            peer = to,
            ?backoff,
            "raft stream to peer ended; reconnecting"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Incoming side: the RaftTransport gRPC service.
pub struct RaftService {
    raft: RaftHandle,
}

impl RaftService {
    pub fn new(raft: RaftHandle) -> Self {
        RaftService { raft }
    }
}

#[tonic::async_trait]
impl pb::raft_transport_server::RaftTransport for RaftService {
    async fn send(
        &self,
        req: Request<Streaming<pb::RaftEnvelope>>,
    ) -> Result<Response<pb::RaftSendResponse>, Status> {
        // With TLS on, raft messages come only from members.
        weft_common::tls::require_role(&req, weft_common::tls::Role::Rm, "a raft message")?;
        let mut stream = req.into_inner();
        let me = self.raft.status().id;
        // Whose stream this is, once its first message says: when it ends
        // (a killed leader's connections close at once), raft hears of it,
        // also when the connection's end drops this call unfinished.
        let mut ended = StreamEnd {
            raft: &self.raft,
            from: None,
        };
        while let Some(env) = stream.message().await? {
            if env.to != me {
                return Err(Status::invalid_argument(format!(
                    "to: message for member {} reached member {me}",
                    env.to
                )));
            }
            let m = Message::parse_from_bytes(&env.message).map_err(|e| {
                Status::invalid_argument(format!("message: not a raft message: {e}"))
            })?;
            ended.from = Some(m.from);
            self.raft.step(m);
        }
        Ok(Response::new(pb::RaftSendResponse {}))
    }
}

/// Tells raft that a peer's stream ended, when dropped.
struct StreamEnd<'a> {
    raft: &'a RaftHandle,
    from: Option<u64>,
}

impl Drop for StreamEnd<'_> {
    fn drop(&mut self) {
        if let Some(peer) = self.from {
            self.raft.peer_stream_ended(peer);
        }
    }
}
