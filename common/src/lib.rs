//! What every Weft process shares.
//!
//! - [`daemon`]: a daemon's `main` (runtime, listener, shutdown on SIGTERM).
//! - [`telemetry`]: `tracing` setup, human or JSON lines.
//! - [`backoff`]: jittered exponential backoff; [`codes`]: which errors are retried.
//! - [`leader`]: the one client loop that finds the resource-manager leader,
//!   follows its NotLeader answers and retries across elections; `rmctl` and
//!   the client library, the node agent's tracker and the application master
//!   all call the RM through it.
//! - [`net`]: gRPC endpoints and servers with connect deadlines and
//!   keepalives, so a frozen peer holds no call for long.
//! - [`tls`]: mutual TLS for every connection (when configured), the
//!   certificates `rmctl tls` makes, and the identity a peer's certificate names.
//! - [`clock`]: the time source the resource manager's timers read, so tests
//!   can move it by hand.

pub mod backoff;
pub mod clock;
pub mod codes;
pub mod daemon;
pub mod http;
pub mod leader;
pub mod net;
pub mod telemetry;
pub mod tls;
