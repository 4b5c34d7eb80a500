//! End-to-end tests: the gateway in front of a real PostgreSQL, driven by real
//! clients (psql, pgbench, tokio-postgres) and by a raw protocol client for
//! what real drivers never send. One binary, one cluster, a database per test
//! (`cluster` starts one more: how a cluster stops is what it tests).

mod harness;

mod api;
mod approvals;
mod audit;
mod bad_input;
mod bot;
mod cli;
mod clients;
mod cluster;
mod console;
mod identity;
mod lifecycle;
mod login;
mod masking;
mod pgbench;
mod policy;
mod refusals;
mod tls;
mod upstream;
