//! The one client loop every caller of the resource manager uses: it takes
//! any subset of the members' addresses, finds the leader, follows NotLeader
//! answers (the leader's address in [`LEADER_HEADER`] metadata) and retries
//! retryable errors with jittered exponential backoff until a deadline (or
//! for good, for daemons), so callers do not see a failover.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::backoff::Backoff;

/// gRPC metadata key carrying the leader's address on NotLeader answers.
pub const LEADER_HEADER: &str = "weft-leader";

/// Redirects followed at once before backing off (a hint may be stale).
const MAX_REDIRECTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: no address given")]
    NoAddress(&'static str),
    #[error("{address:?} is not a valid address: {reason}")]
    InvalidAddress { address: String, reason: String },
    /// The RM answered with an error that retrying cannot fix.
    #[error("{}", .0.message())]
    Rpc(Status),
    /// No member answered as leader before the deadline.
    #[error("cannot reach a resource-manager leader at {tried} within {deadline:?}: {last}")]
    Unreachable {
        tried: String,
        deadline: Duration,
        last: String,
    },
}

impl Error {
    /// The gRPC code, where the RM answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Rpc(s) => Some(s.code()),
            _ => None,
        }
    }

    /// As a gRPC status (an unreachable leader is UNAVAILABLE).
    pub fn into_status(self) -> Status {
        match self {
            Error::Rpc(s) => s,
            Error::Unreachable { .. } => Status::unavailable(self.to_string()),
            e => Status::invalid_argument(e.to_string()),
        }
    }
}

pub use crate::codes::retryable;

/// The leader address a NotLeader answer names, if any.
pub fn leader_hint(s: &Status) -> Option<String> {
    s.metadata()
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

use crate::net::uri;

/// How long a member that failed a call is passed over while another may
/// answer (it may be frozen, partitioned or restarting).
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// For this long after a call's first failure its retries come at most
/// [`FAST_RETRY_WAIT`] apart, whatever the backoff: an election takes well
/// under this, and a caller that slept through the moment the new leader
/// became known would add its sleep to the failover.
const FAST_RETRY_FOR: Duration = Duration::from_secs(3);
const FAST_RETRY_WAIT: Duration = Duration::from_millis(100);

/// A client of the RM group that follows its leader.
#[derive(Debug)]
pub struct LeaderClient {
    addresses: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<String>>,
    /// Members whose last attempt failed, and when: passed over by [`pick`]
    /// for [`SUSPECT_FOR`] while another member is not.
    suspects: Mutex<HashMap<String, Instant>>,
    next: AtomicUsize,
    /// The TLS generation `channels` were made under.
    tls_generation: AtomicU64,
    /// None: retry for good (daemons); Some: give up after this long.
    deadline: Option<Duration>,
    connect_timeout: Duration,
    request_timeout: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    /// Log a warning once a call has failed this many times in a row.
    warn_after: Option<u32>,
}

impl LeaderClient {
    /// A client of the members at `addresses` (host:port or a URI): 30 s
    /// deadline, 10 s per request, backoff 20 ms doubling to 500 ms.
    pub fn new<I, S>(addresses: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let addresses: Vec<String> = addresses
            .into_iter()
            .map(Into::into)
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addresses.is_empty() {
            return Err(Error::NoAddress("resource manager addresses"));
        }
        for a in &addresses {
            Endpoint::from_shared(uri(a)).map_err(|e| Error::InvalidAddress {
                address: a.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(LeaderClient {
            addresses,
            channels: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            suspects: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            tls_generation: AtomicU64::new(crate::tls::generation()),
            deadline: Some(Duration::from_secs(30)),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            warn_after: None,
        })
    }

    /// How long a call keeps retrying; `None` retries until the caller drops it.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// Per-request timeout (long polls need more than the default 10 s).
    pub fn with_request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self.channels.lock().expect("channels lock").clear();
        self
    }

    /// Connect timeout per attempt (default 1 s).
    pub fn with_connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self.channels.lock().expect("channels lock").clear();
        self
    }

    /// Backoff between failed attempts.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Log one warning when a call has failed `n` times in a row.
    pub fn warn_after(mut self, n: u32) -> Self {
        self.warn_after = Some(n);
        self
    }

    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The member that answered last, if it is still believed to lead.
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().expect("leader lock").clone()
    }

    /// Go to `addr` next (a leader named in an answer body).
    pub fn follow(&self, addr: String) {
        *self.leader.lock().expect("leader lock") = Some(addr);
    }

    /// Forget the leader: the next call tries the members in turn.
    pub fn forget_leader(&self) {
        *self.leader.lock().expect("leader lock") = None;
    }

    /// A channel to `addr` (cached; connects lazily).
    pub fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut ch = self.channels.lock().expect("channels lock");
        // Certificates reloaded since: new connections show the new ones.
        let generation = crate::tls::generation();
        if self.tls_generation.swap(generation, Ordering::Relaxed) != generation {
            ch.clear();
        }
        if let Some(c) = ch.get(addr) {
            return Ok(c.clone());
        }
        let c = crate::net::endpoint(
            addr,
            crate::tls::Role::Rm,
            self.connect_timeout,
            Some(self.request_timeout),
        )
        .map_err(|e| Error::InvalidAddress {
            address: addr.to_string(),
            reason: e.to_string(),
        })?
        .connect_lazy();
        ch.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// The member to try next: the known leader, else the members in turn,
    /// passing over those that failed within [`SUSPECT_FOR`] while one has
    /// not.
    fn pick(&self) -> String {
        if let Some(l) = self.leader() {
            return l;
        }
        let n = self.addresses.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut suspects = self.suspects.lock().expect("suspects lock");
        suspects.retain(|_, at| at.elapsed() < SUSPECT_FOR);
        (0..n)
            .map(|k| &self.addresses[(first + k) % n])
            .find(|a| !suspects.contains_key(*a))
            .unwrap_or(&self.addresses[first % n])
            .clone()
    }

    fn suspect(&self, addr: &str) {
        self.suspects
            .lock()
            .expect("suspects lock")
            .insert(addr.to_string(), Instant::now());
    }

    /// Calls `f` on the leader's channel, following redirects and retrying
    /// retryable errors with backoff until the deadline.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        let mut redirects = 0;
        // The last error a member gave (not this call's own deadline): what
        // an Unreachable names (a TLS handshake refused, say).
        let mut last_said: Option<String> = None;
        loop {
            let addr = self.pick();
            // No attempt outlives the call's deadline (a frozen member
            // accepts connections and never answers).
            let remaining = self.deadline.map(|d| d.saturating_sub(start.elapsed()));
            let attempt = f(self.channel(&addr)?);
            let answer = match remaining {
                Some(left) => tokio::time::timeout(left, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "{addr} did not answer within the call's deadline"
                        )))
                    }),
                None => attempt.await,
            };
            let err = match answer {
                Ok(r) => {
                    self.suspects.lock().expect("suspects lock").remove(&addr);
                    self.follow(addr);
                    return Ok(r.into_inner());
                }
                Err(s) if retryable(&s) => s,
                Err(s) => return Err(Error::Rpc(plaintext_hint(s))),
            };
            let hint = leader_hint(&err);
            tracing::debug!(rm = %addr, error = %err.message(), leader_hint = ?hint, "retrying");
            let hint = hint.filter(|h| *h != addr);
            let redirected = hint.is_some();
            if !redirected {
                // Not a follower naming the leader: this member could not
                // serve the call (down, frozen, electing); try the others
                // before it again.
                self.suspect(&addr);
            }
            *self.leader.lock().expect("leader lock") = hint;
            // A follower named the leader: go there at once (a few times;
            // then back off, as the hint may be stale).
            if redirected && redirects < MAX_REDIRECTS {
                redirects += 1;
                continue;
            }
            if let Some(deadline) = self.deadline {
                if start.elapsed() >= deadline {
                    let last = match last_said {
                        Some(said) if err.code() == tonic::Code::DeadlineExceeded => {
                            format!("{said} (then: {})", err.message())
                        }
                        _ => err.message().to_string(),
                    };
                    return Err(Error::Unreachable {
                        tried: self.addresses.join(","),
                        deadline,
                        last,
                    });
                }
            }
            if err.code() != tonic::Code::DeadlineExceeded {
                last_said = Some(describe(&err));
            }
            if self.warn_after == Some(backoff.attempts()) {
                tracing::warn!(rm = %addr, error = %err.message(), "no resource-manager leader answers yet; still retrying");
            }
            // Right after a failover the new leader is usually known within
            // a second: retry often then (a follower's answer names it), and
            // back off further only when the group stays leaderless.
            let wait = if start.elapsed() < FAST_RETRY_FOR {
                backoff.next_wait().min(FAST_RETRY_WAIT)
            } else {
                backoff.next_wait()
            };
            let wait = match self.deadline {
                Some(d) => wait.min(d.saturating_sub(start.elapsed())),
                None => wait,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// A status's message with its source errors (a refused TLS handshake is
/// only named there).
fn describe(s: &Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = e.source();
    }
    text
}

/// A plaintext client of a TLS-only member gets only an HTTP/2 protocol
/// error: say what it likely means.
fn plaintext_hint(s: Status) -> Status {
    if crate::tls::installed().is_none() && s.message().contains("h2 protocol error") {
        Status::new(
            s.code(),
            format!(
                "{} (the members may serve TLS only: give the cluster's CA with --tls-ca or WEFT_TLS_CA)",
                s.message()
            ),
        )
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_that_never_answers_holds_a_call_no_longer_than_its_deadline() {
        // A frozen member: its kernel accepts the connection, nothing answers.
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = frozen.local_addr().unwrap().to_string();
        let client = LeaderClient::new([addr.clone()])
            .unwrap()
            .with_deadline(Some(Duration::from_millis(300)));
        let start = Instant::now();
        let r: Result<(), Error> = client
            .call(|_ch| async {
                std::future::pending::<Result<tonic::Response<()>, Status>>().await
            })
            .await;
        let took = start.elapsed();
        match r {
            Err(Error::Unreachable { tried, last, .. }) => {
                assert_eq!(tried, addr);
                assert!(last.contains("did not answer"), "{last}");
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        // The request timeout (10 s) is not what ends it.
        assert!(took < Duration::from_secs(5), "took {took:?}");
    }
}
