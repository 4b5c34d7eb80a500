//! Sluice's enforcement core: everything that decides what reaches the
//! database and what comes back. The CLI in `src/main.rs` only wires it up.
//!
//! Layers, bottom up: `protocol` (wire messages as values, no IO), `net` and
//! `conn` (streams and framed reading), `tls`, `identity` (tokens to
//! identities), `upstream` (the gateway's own logins), `gate` (the statement
//! seam), `session` (one client from accept to close) and `server` (listener,
//! limits, shutdown). See ARCHITECTURE.md for the map and the invariants.

pub mod api;
pub mod approvals;
pub mod audit;
pub mod cancel;
pub mod config;
pub mod conn;
pub mod devcluster;
pub mod gate;
pub mod identity;
pub mod live;
pub mod mask;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod text;
pub mod tls;
pub mod tunnel;
pub mod upstream;

pub use config::Config;
pub use gate::{AllowAll, StatementGate};
pub use policy::PolicyGate;
pub use server::{Gateway, GatewayError};
