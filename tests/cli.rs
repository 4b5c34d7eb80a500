//! The `sluice` binary itself: the README's demo command, `serve` with a
//! configuration file and SIGTERM, `config check` and `hash-token`.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{self, Spec, stdout_ok};

fn sluice() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.kill_on_drop(true);
    cmd
}

/// Sends a signal to a child process.
fn signal(child: &Child, signal: i32) {
    let pid = child.id().expect("child pid") as i32;
    // SAFETY: kill with a live child's pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

async fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    tokio::time::timeout(harness::PATIENCE, child.wait())
        .await
        .expect("sluice did not exit")
        .expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_connection_strings_that_work() {
    // What the demo says on stderr, to explain a failure.
    let log_file = harness::cluster().dev.dir().join("demo-stderr.log");
    let mut child = sluice()
        .args(["demo", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"])
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .expect("sluice demo");
    let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("demo banner")
        .unwrap()
    {
        let done = line.starts_with("Press ctrl-c");
        banner.push(line);
        if done {
            break;
        }
    }
    let commands: Vec<&String> = banner
        .iter()
        .filter(|l| l.trim_start().starts_with("PGPASSWORD="))
        .collect();
    assert_eq!(commands.len(), 5, "{banner:#?}\n{}", log());
    // Paste each printed command, as a user would.
    for command in commands {
        let script = format!("{} -X -A -t -c 'SELECT count(*) FROM customers'", command.trim());
        let out = Command::new("sh").args(["-c", &script]).output().await.unwrap();
        assert_eq!(stdout_ok(&out), "60\n", "{command}");
    }
    let ca_dir = banner
        .iter()
        .find_map(|l| l.split("sslrootcert=").nth(1))
        .map(|rest| {
            std::path::PathBuf::from(rest.trim_end_matches('"'))
                .parent()
                .unwrap()
                .to_path_buf()
        })
        .expect("the verify-full command names the CA");
    assert!(ca_dir.exists());

    signal(&child, libc::SIGINT);
    assert!(exit_status(&mut child).await.success());
    assert!(!ca_dir.exists(), "the demo's files are removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_a_config_file_and_stops_on_sigterm() {
    let db = harness::database("cli_serve").await;
    let text = harness::config_text(&Spec::default(), &db);
    let path = harness::cluster().dev.dir().join(format!("{db}.toml"));
    std::fs::write(&path, text).unwrap();
    let (mut child, mut lines, port) = harness::serve_binary(&path).await;
    let conn = format!(
        "host=127.0.0.1 port={port} dbname={db} user=alice password={}",
        harness::ALICE
    );
    let out = harness::psql(&conn, &["-c", "SELECT 'served'"], None).await;
    assert_eq!(stdout_ok(&out), "served\n");

    signal(&child, libc::SIGTERM);
    assert!(exit_status(&mut child).await.success());
    let mut rest = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert!(
        rest.contains("SIGTERM received") && rest.contains("gateway stopped"),
        "{rest}"
    );
    // Logs never carry the token.
    assert!(!rest.contains(harness::ALICE), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_reports_problems_with_lines() {
    let ok = sluice()
        .args(["config", "check", "--config", "config/sluice.toml"])
        .env("SLUICE_APP_DEPLOYER_PASSWORD", "x")
        .output()
        .await
        .unwrap();
    assert_eq!(
        stdout_ok(&ok),
        "config/sluice.toml: OK (1 target, 1 service token, OIDC off)\n"
    );
    let demo = sluice()
        .args(["config", "check", "--config", "config/demo.toml"])
        .output()
        .await
        .unwrap();
    assert!(stdout_ok(&demo).contains("OK (1 target, 4 service tokens"));

    let path = harness::cluster().dev.dir().join("broken.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = \"localhost\"\n\n[[targets]]\nname = \"x\"\nhost = \"db\"\ntls = \"maybe\"\n",
    )
    .unwrap();
    let bad = sluice()
        .args(["config", "check", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("broken.toml:2: server.listen = \"localhost\" is not an address"),
        "{err}"
    );
    assert!(
        err.contains("broken.toml:7: target \"x\": tls = \"maybe\" is not a mode"),
        "{err}"
    );
    assert!(err.contains("no identity source"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_token_matches_what_the_gateway_checks() {
    let mut child = sluice()
        .arg("hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"alice-test-token\n")
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let expected = {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(b"alice-test-token");
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    assert_eq!(stdout_ok(&out), format!("sha256: {expected}\n"));
}

/// The shipped table of expected decisions passes against the demo policy,
/// and it is the table the issue asks for: hundreds of cases, bypass attempts
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_test_runs_the_shipped_corpus() {
    let out = sluice()
        .args([
            "policy",
            "test",
            "--config",
            "config/demo.toml",
            "config/policy-tests.toml",
        ])
        .output()
        .await
        .unwrap();
    let text = stdout_ok(&out);
    let summary = text.lines().last().unwrap_or_default();
    let total: usize = summary.split(' ').next().unwrap().parse().expect(summary);
    assert!(total >= 200, "{summary}");
    assert!(summary.contains(&format!("{total} passed, 0 failed")), "{summary}");
}

/// A case that does not hold fails the run, and the report says which case,
/// for whom, and what differed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_test_reports_a_failing_case() {
    let path = harness::cluster().dev.dir().join("failing-cases.toml");
    std::fs::write(
        &path,
        r#"
[defaults]
user = "alice"
groups = ["engineering"]
target = "shop"

[[cases]]
sql = "SELECT 1"
expect = "allow"

[[cases]]
sql = "/* harmless */ DROP TABLE customers"
expect = "allow"
"#,
    )
    .unwrap();
    let out = sluice()
        .args(["policy", "test", "--config", "config/demo.toml"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("case 2 failed: /* harmless */ DROP TABLE customers"),
        "{text}"
    );
    assert!(text.contains("2 cases, 1 passed, 1 failed"), "{text}");
}

/// `policy check` explains a decision and reports it in its exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_explains_a_refusal() {
    let out = sluice()
        .args([
            "policy",
            "check",
            "--config",
            "config/demo.toml",
            "--user",
            "alice",
            "--groups",
            "engineering",
            "--target",
            "shop",
            "DROP TABLE customers",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("no-drop-or-truncate"), "{text}");
    assert!(text.contains("customers (ddl)"), "{text}");

    let read = sluice()
        .args([
            "policy",
            "check",
            "--config",
            "config/demo.toml",
            "--user",
            "alice",
            "--groups",
            "engineering",
            "--target",
            "shop",
            "SELECT * FROM orders",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(read.status.code(), Some(0), "{read:?}");
}
