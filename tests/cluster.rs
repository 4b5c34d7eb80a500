//! The throwaway cluster itself (`sluice_core::devcluster`, which
//! `sluice demo` and this harness use): the one test here starts a cluster
//! of its own, since what it checks is how a cluster stops.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use sluice_core::devcluster::{ClusterOptions, DevCluster};

/// The server runs as postgres when we are root, in a session of its own
/// (no way to our terminal), and stopping the cluster removes its
/// directory with whatever we put there, even a private directory of ours
/// that postgres cannot enter.
#[test]
fn the_server_runs_apart_and_stop_removes_everything() {
    let cluster = DevCluster::start(&ClusterOptions::default()).expect("starting PostgreSQL");
    let dir = cluster.dir().to_path_buf();
    let pid_file = std::fs::read_to_string(dir.join("data/postmaster.pid")).expect("postmaster.pid");
    let pid = pid_file.lines().next().unwrap().trim().to_string();

    // SAFETY: geteuid has no preconditions and cannot fail.
    let we = unsafe { libc::geteuid() };
    let expected = if we == 0 {
        let id = std::process::Command::new("id")
            .args(["-u", "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&id.stdout).trim().parse().unwrap()
    } else {
        we
    };
    let server_uid = std::fs::metadata(format!("/proc/{pid}"))
        .expect("the server's process")
        .uid();
    assert_eq!(server_uid, expected, "the server's user");

    // /proc/PID/stat: "pid (comm) state ppid pgrp session ...".
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let server_session: i32 = after_comm.split(' ').nth(3).unwrap().parse().unwrap();
    // SAFETY: getsid(0) asks for our own session; it has no preconditions.
    let our_session = unsafe { libc::getsid(0) };
    assert_ne!(server_session, our_session, "the server shares our session");

    assert_eq!(cluster.psql("postgres", "SELECT 42").unwrap().trim(), "42");

    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("token"), "secret").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    cluster.stop();
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
