//! Throwaway PostgreSQL clusters for `sluice demo` and the end-to-end tests.
//!
//! A cluster lives in a fresh temporary directory, listens on loopback on a
//! free port, and is watched by a small guardian shell whose standard input is
//! a pipe from this process: when this process exits, however it exits, the
//! pipe closes and the guardian stops PostgreSQL and removes the directory.
//! As root, PostgreSQL refuses to run, so the server and its setup run as
//! `postgres` (through `runuser` and `setpriv`), while the guardian stays root:
//! it must remove what root put in the directory too (the tests keep token
//! caches and console state there). This is the only module of the core that
//! spawns processes, and nothing on the gateway's own path uses it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a cluster could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found in $SLUICE_PG_BIN, $PATH or \
         /usr/lib/postgresql/*/bin: install them (apt-get install postgresql)"
    )]
    NoBinaries,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error("PostgreSQL did not start within {after:?}; its log ends with:\n{log}")]
    StartTimeout { after: Duration, log: String },
    #[error("PostgreSQL exited during startup; its log ends with:\n{log}")]
    Exited { log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// How to set a cluster up.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// pg_hba.conf lines, checked in order after the `postgres` superuser's
    /// (SCRAM over the socket and loopback, which no line here can open)
    /// and before the default (SCRAM for every role over loopback).
    pub hba: Vec<String>,
    /// Extra postgresql.conf settings.
    pub settings: Vec<(String, String)>,
    /// Server certificate and key (PEM): turns `ssl` on.
    pub tls: Option<(String, String)>,
}

/// A running throwaway cluster. Dropping it stops the server and removes its
/// files.
pub struct DevCluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// The `postgres` superuser's password, random per cluster: any local
    /// user can reach the port, and a superuser can run code as the
    /// server's user.
    superuser_password: String,
    /// Closing this tells the guardian to stop the server.
    guardian_stdin: Option<ChildStdin>,
    guardian: Child,
}

/// Locates `initdb`, `pg_ctl` and `postgres`.
pub fn find_binaries() -> Result<PathBuf, ClusterError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("SLUICE_PG_BIN").map(PathBuf::from)
        && has_server(&dir)
    {
        return Ok(dir);
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(dir) = std::env::split_paths(&path).find(|dir| has_server(dir))
    {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or(ClusterError::NoBinaries)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A free loopback port, as the OS hands one out. PostgreSQL cannot bind port
/// 0 and report it, so the port is picked here and the start is retried if
/// another process takes it in between.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("picking a free port"))?;
    Ok(listener.local_addr().map_err(io("picking a free port"))?.port())
}

impl DevCluster {
    /// Creates and starts a cluster. Blocking; takes about a second.
    pub fn start(options: &ClusterOptions) -> Result<DevCluster, ClusterError> {
        let bin = find_binaries()?;
        let as_postgres = running_as_root();
        let dir = std::env::temp_dir().join(format!("sluice-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let cluster_dir = ClusterDir {
            dir: dir.clone(),
            armed: true,
        };
        let sock = dir.join("sock");
        std::fs::create_dir(&sock).map_err(io(format!("creating {}", sock.display())))?;
        // The server's user and group, when it must not run as us. The
        // socket directory is handed over while the directory is still
        // ours; from then on, files there are written as the server's user
        // (`write_as`).
        let server_ids = if as_postgres {
            let uid = id_of("-u")?;
            let gid = id_of("-g")?;
            for path in [&sock, &dir] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(io(format!("chown {}", path.display())))?;
            }
            Some((uid, gid))
        } else {
            None
        };
        let data = dir.join("data");
        let superuser_password = format!("{:032x}", rand::random::<u128>());
        let password_file = dir.join("superuser-password");
        write_as(as_postgres, &password_file, &superuser_password, FileWrite::Private)?;
        let mut initdb = command(as_postgres, &bin.join("initdb"));
        initdb
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg(format!("--pwfile={}", password_file.display()));
        let initialized = run(&mut initdb, "initdb");
        std::fs::remove_file(&password_file).map_err(io(format!("removing {}", password_file.display())))?;
        initialized?;

        // No trust for the superuser anywhere (its lines come first, so that
        // no line of the options can open it), as the demo runs on shared
        // machines too.
        let mut hba = String::from("local all postgres scram-sha-256\nhost all postgres 127.0.0.1/32 scram-sha-256\n");
        for line in &options.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        hba.push_str("host all all 127.0.0.1/32 scram-sha-256\n");
        write_as(as_postgres, &data.join("pg_hba.conf"), &hba, FileWrite::Replace)?;
        let mut conf = String::from(
            "\n# Added by sluice devcluster\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 300\n\
             listen_addresses = '127.0.0.1'\nunix_socket_permissions = 0700\nlogging_collector = off\n\
             log_min_messages = warning\n",
        );
        conf.push_str(&format!("unix_socket_directories = '{}'\n", dir.join("sock").display()));
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        if let Some((cert, key)) = &options.tls {
            write_as(as_postgres, &data.join("server.crt"), cert, FileWrite::Replace)?;
            write_as(as_postgres, &data.join("server.key"), key, FileWrite::Private)?;
            conf.push_str("ssl = on\n");
        }
        write_as(as_postgres, &data.join("postgresql.conf"), &conf, FileWrite::Append)?;

        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::launch(&dir, &bin, port, server_ids) {
                Ok((guardian, stdin)) => {
                    let mut cluster_dir = cluster_dir;
                    cluster_dir.armed = false;
                    return Ok(DevCluster {
                        dir,
                        bin,
                        port,
                        superuser_password,
                        guardian_stdin: Some(stdin),
                        guardian,
                    });
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.unwrap_or(ClusterError::NoBinaries))
    }

    fn launch(
        dir: &Path,
        bin: &Path,
        port: u16,
        server_ids: Option<(u32, u32)>,
    ) -> Result<(Child, ChildStdin), ClusterError> {
        let log = dir.join("postgres.log");
        // The guardian ignores the terminal's signals: it stops the server
        // only when this process's end of the pipe closes. It runs as this
        // process's user, so that it can remove everything in the directory;
        // as root, the server runs as postgres through setpriv, which execs
        // (unlike runuser, which forks and stays as the parent), and the
        // shell it runs execs the server, so `$!` is the server's pid and
        // the INT reaches the server itself: a fast shutdown. That shell
        // opens the log as the server's user: in the server's directory,
        // root writes nothing.
        let script = r#"
trap '' INT TERM HUP
$PGAS sh -c 'exec "$1" -D "$2" -p "$3" >"$4" 2>&1' sh "$PGBIN/postgres" "$PGDIR/data" "$PGPORT" "$PGDIR/postgres.log" &
pg=$!
echo "$pg"
read _ignored
kill -INT "$pg" 2>/dev/null
wait "$pg"
rm -rf "$PGDIR"
"#;
        let mut guardian = Command::new("sh");
        guardian
            .args(["-c", script])
            .env(
                "PGAS",
                server_ids.map_or(String::new(), |(uid, gid)| {
                    format!("setpriv --reuid={uid} --regid={gid} --init-groups --")
                }),
            )
            .env("PGBIN", bin)
            .env("PGDIR", dir)
            .env("PGPORT", port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // A session of its own, without a controlling terminal: ctrl-c in
        // the terminal reaches this process (which then shuts down in order)
        // and not the server directly, and the server, which runs as another
        // user, cannot open the terminal of whoever started it (as root, to
        // push keystrokes into it with TIOCSTI).
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent; it is all that runs between fork and exec here.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut guardian, || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = guardian.spawn().map_err(io("starting PostgreSQL"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| ClusterError::Exited { log: String::new() })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| ClusterError::Exited { log: String::new() })?;
        let mut pid_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut pid_line)
            .map_err(io("reading the PostgreSQL pid"))?;
        let pid: u32 = pid_line.trim().parse().unwrap_or(0);

        let socket = dir.join("sock").join(format!(".s.PGSQL.{port}"));
        let started = Instant::now();
        let timeout = Duration::from_secs(60);
        loop {
            if socket.exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok((child, stdin));
            }
            if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
                drop(stdin);
                let _ = child.wait();
                return Err(ClusterError::Exited { log: tail(&log) });
            }
            if started.elapsed() > timeout {
                drop(stdin);
                let _ = child.wait();
                return Err(ClusterError::StartTimeout {
                    after: timeout,
                    log: tail(&log),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory; files put there are removed with it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The directory holding the server's binaries (`pg_ctl`, `pgbench`...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A libpq connection string for the superuser on `database`, its
    /// password included: for a driver in this process, never for a
    /// command line (which every local user can read in /proc).
    pub fn superuser_url(&self, database: &str) -> String {
        format!(
            "{} password={}",
            self.superuser_address(database),
            self.superuser_password
        )
    }

    /// [`DevCluster::superuser_url`] without the password.
    fn superuser_address(&self, database: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={database}", self.port)
    }

    /// Runs SQL as the superuser with psql and returns its output (unaligned,
    /// tuples only). Stops at the first error.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = Command::new(self.psql_path());
        // The password in the environment, which only we and root can read.
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-w", "-d"])
            .arg(self.superuser_address(database))
            .env("PGPASSWORD", &self.superuser_password)
            .stdin(Stdio::piped());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("running psql"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(sql.as_bytes()).map_err(io("writing to psql"))?;
        }
        let output = child.wait_with_output().map_err(io("running psql"))?;
        if !output.status.success() {
            return Err(ClusterError::Command {
                command: "psql".into(),
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The psql beside the server's binaries, or the one on `$PATH`.
    pub fn psql_path(&self) -> PathBuf {
        let local = self.bin.join("psql");
        if local.is_file() { local } else { PathBuf::from("psql") }
    }

    /// Stops the server and removes its files, waiting until both are done.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(stdin) = self.guardian_stdin.take() {
            drop(stdin);
            let _ = self.guardian.wait();
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Removes the directory if setup fails before the guardian owns it.
struct ClusterDir {
    dir: PathBuf,
    armed: bool,
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), ClusterError> {
    let output = cmd.output().map_err(io(format!("running {what}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            command: what.to_string(),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// How [`write_as`] writes a file.
#[derive(Debug, Clone, Copy)]
enum FileWrite {
    /// Creates it or replaces what it holds.
    Replace,
    /// Adds to its end.
    Append,
    /// Creates it (it must not exist), readable by its owner only.
    Private,
}

/// Writes a file of the cluster. As root, the server's user does: the
/// directory is the server's by then, and a write of ours there could be
/// turned onto any file of the machine by a symlink put in the file's
/// place. The contents go through a pipe, never a command line.
fn write_as(as_postgres: bool, path: &Path, contents: &str, how: FileWrite) -> Result<(), ClusterError> {
    let what = || format!("writing {}", path.display());
    if as_postgres {
        let script = match how {
            FileWrite::Replace => r#"cat > "$1""#,
            FileWrite::Append => r#"cat >> "$1""#,
            FileWrite::Private => r#"set -C; umask 077; cat > "$1""#,
        };
        let mut child = command(true, Path::new("sh"))
            .args(["-c", script, "sh"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(what()))?;
        let written = child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(contents.as_bytes()))
            .unwrap_or(Ok(()));
        let output = child.wait_with_output().map_err(io(what()))?;
        if !output.status.success() {
            return Err(ClusterError::Command {
                command: what(),
                status: output.status.to_string(),
                output: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        return written.map_err(io(what()));
    }
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    match how {
        FileWrite::Replace => options.write(true).create(true).truncate(true),
        FileWrite::Append => options.append(true),
        FileWrite::Private => options.write(true).create_new(true).mode(0o600),
    };
    let mut file = options.open(path).map_err(io(what()))?;
    file.write_all(contents.as_bytes()).map_err(io(what()))
}

fn id_of(flag: &str) -> Result<u32, ClusterError> {
    let output = Command::new("id")
        .args([flag, "postgres"])
        .output()
        .map_err(io("looking up the postgres user"))?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|_| ClusterError::Command {
            command: format!("id {flag} postgres"),
            status: output.status.to_string(),
            output: "running as root needs a `postgres` user to run PostgreSQL as".into(),
        })
}

/// The end of the server's log (read without following a symlink: the
/// directory is the server's user's).
fn tail(log: &Path) -> String {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
    {
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A private CA and one server certificate it signed, all PEM: TLS material
/// for the demo and the tests. Never for production, where certificates come
/// from the operator's own CA.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
}

impl DevPki {
    /// Issues a certificate for `names` (DNS names or IP addresses).
    pub fn generate(ca_name: &str, names: &[&str]) -> Result<DevPki, rcgen::Error> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate()?;
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let server_cert = params.signed_by(&server_key, &issuer)?;
        Ok(DevPki {
            ca_cert: ca_cert.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `server.pem` and `server.key` (0600) into `dir`.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<(PathBuf, PathBuf, PathBuf)> {
        use std::os::unix::fs::PermissionsExt;
        let ca = dir.join("ca.pem");
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        std::fs::write(&ca, &self.ca_cert)?;
        std::fs::write(&cert, &self.server_cert)?;
        std::fs::write(&key, &self.server_key)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        Ok((ca, cert, key))
    }
}
