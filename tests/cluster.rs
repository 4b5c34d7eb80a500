//! The throwaway cluster itself (`sluice_core::devcluster`, which
//! `sluice demo` and this harness use): the one test here starts a cluster
//! of its own, since what it checks is how a cluster stops.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use sluice_core::devcluster::{ClusterOptions, DevCluster};

/// The server runs as postgres when we are root, in a session of its own
/// (no way to our terminal), and its files are its own; its superuser
/// needs the cluster's password
/// over loopback and the socket alike; and stopping the cluster removes
/// its directory with whatever we put there, even a private directory of
/// ours that postgres cannot enter.
#[test]
fn the_server_runs_apart_locked_and_stop_removes_everything() {
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
    // The directory is the server's user's: what is in it is written by
    // that user too (as root, a write of ours there could be redirected).
    for file in ["postgres.log", "data/pg_hba.conf", "data/postgresql.conf"] {
        let owner = std::fs::symlink_metadata(dir.join(file)).expect(file).uid();
        assert_eq!(owner, expected, "{file} belongs to another user");
    }

    // /proc/PID/stat: "pid (comm) state ppid pgrp session ...".
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let server_session: i32 = after_comm.split(' ').nth(3).unwrap().parse().unwrap();
    // SAFETY: getsid(0) asks for our own session; it has no preconditions.
    let our_session = unsafe { libc::getsid(0) };
    assert_ne!(server_session, our_session, "the server shares our session");

    assert_eq!(cluster.psql("postgres", "SELECT 42").unwrap().trim(), "42");

    // Any local user can reach the port: without the password, or with
    // another, the superuser is refused, over TCP and over the socket.
    let psql = cluster.psql_path();
    let port = cluster.port().to_string();
    let socket = cluster.socket_dir();
    for (host, password) in [
        ("127.0.0.1", None),
        ("127.0.0.1", Some("postgres")),
        (socket.to_str().unwrap(), None),
    ] {
        let mut command = std::process::Command::new(&psql);
        command
            .args([
                "-X", "-w", "-h", host, "-p", &port, "-U", "postgres", "-d", "postgres", "-c", "SELECT 1",
            ])
            .env_remove("PGPASSWORD")
            .env("PGPASSFILE", "/dev/null");
        if let Some(password) = password {
            command.env("PGPASSWORD", password);
        }
        let out = command.output().expect("running psql");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{host} with {password:?} let the superuser in");
        assert!(
            said.contains("no password supplied") || said.contains("password authentication failed"),
            "{host} with {password:?}: {said}"
        );
    }
    // Other local users cannot even open the socket.
    if we == 0 {
        let out = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&psql)
            .args([
                "-X",
                "-w",
                "-h",
                socket.to_str().unwrap(),
                "-p",
                &port,
                "-U",
                "postgres",
                "-c",
                "SELECT 1",
            ])
            .env_remove("PGPASSWORD")
            .output()
            .expect("running psql as nobody");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nobody connected through the socket");
        assert!(said.contains("Permission denied"), "{said}");
    }

    let private = dir.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("token"), "secret").unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    cluster.stop();
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
