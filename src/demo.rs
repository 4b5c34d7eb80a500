//! `sluice demo`: a throwaway PostgreSQL with the shop demo data, a demo CA,
//! and a gateway in front, all gone again on ctrl-c.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use sluice_core::config::{TlsFiles, UpstreamAddress};
use sluice_core::devcluster::{ClusterOptions, DevCluster, DevPki};
use sluice_core::{Config, Gateway, PolicyGate};

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
const DEMO_POLICY: &str = include_str!("../config/policy.toml");
const DEMO_DATA: &str = include_str!("../config/demo/shop.sql");

/// The demo identities and what they may do, for the banner.
const PEOPLE: [(&str, &str); 4] = [
    ("alice", "engineering: reads as shop_reader"),
    ("bob", "oncall: writes as shop_writer"),
    ("carol", "leads: writes as shop_writer, sees clear values"),
    (
        "report-bot",
        "an AI agent (labels kind=agent, model=demo-model-1): reads",
    ),
];

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(listen: SocketAddr, api_listen: SocketAddr, console: bool) -> anyhow::Result<()> {
    let log_file = crate::state_dir().join("demo.log");
    if console {
        // The console owns the screen: the gateway logs to a file.
        sluice_console::init_logging(&log_file)?;
    }
    let work = TempDir(std::env::temp_dir().join(format!("sluice-demo-{:08x}", rand::random::<u32>())));
    std::fs::create_dir_all(&work.0).with_context(|| format!("creating {}", work.0.display()))?;

    eprintln!("Starting a throwaway PostgreSQL and loading the shop demo data...");
    let cluster = tokio::task::spawn_blocking(|| -> anyhow::Result<DevCluster> {
        let cluster = DevCluster::start(&ClusterOptions::default()).context("starting PostgreSQL")?;
        cluster
            .psql("postgres", DEMO_DATA)
            .context("loading config/demo/shop.sql")?;
        Ok(cluster)
    })
    .await
    .context("starting PostgreSQL")??;

    let pki = DevPki::generate("Sluice demo CA", &["localhost", "127.0.0.1"]).context("generating the demo CA")?;
    let (ca, cert, key) = pki
        .write_to(&work.0)
        .with_context(|| format!("writing the demo certificates to {}", work.0.display()))?;

    // The embedded configuration includes its policy file by a relative path:
    // put both side by side in the work directory.
    std::fs::write(work.0.join("policy.toml"), DEMO_POLICY).context("writing the demo policy")?;
    let mut config = Config::from_toml(DEMO_CONFIG, &work.0.join("demo.toml"))?;
    config.server.listen = listen;
    config.api.listen = api_listen;
    config.tls = Some(TlsFiles { cert, key });
    for target in &mut config.targets {
        target.address = UpstreamAddress::Tcp {
            host: "127.0.0.1".into(),
            port: cluster.port(),
        };
    }
    let gate = Arc::new(PolicyGate::new(&config));
    let gateway = Gateway::bind(config, gate)
        .await
        .with_context(|| format!("starting the gateway (is another one on {listen}? try --listen 127.0.0.1:0)"))?;
    let shutdown = crate::shutdown_on_signal()?;
    match (console, gateway.api_addr()) {
        (true, Some(api)) => {
            let address = gateway.local_addr();
            let running = tokio::spawn(gateway.run(shutdown.clone()));
            let (host, port) = (address.ip(), address.port());
            let options = sluice_console::Options {
                api: format!("http://{api}"),
                token: sluice_core::api::client::SharedToken::new("carol-demo-token"),
                postgres: crate::postgres_address(
                    &address.to_string(),
                    sluice_core::api::client::SharedToken::new("carol-demo-token"),
                    None,
                )?,
                target: "shop".into(),
                log_file: log_file.clone(),
                // The demo's statements are not the operator's own.
                history_file: Some(crate::state_dir().join("demo_shell_history")),
                confirm_quit: true,
                footer: vec![
                    "You are carol (a lead and approver). From another terminal, connect as bob (or alice):".into(),
                    format!("PGPASSWORD=bob-demo-token psql \"host={host} port={port} dbname=shop user=bob\""),
                ],
            };
            let result = tokio::select! {
                result = sluice_console::run(options) => result,
                _ = shutdown.cancelled() => Ok(()),
            };
            shutdown.cancel();
            running.await.ok();
            if let Err(err) = &result {
                eprintln!("sluice: the console stopped: {err:#}");
            }
            eprintln!("Console closed (logs: {}).", log_file.display());
        }
        _ => {
            print_banner(gateway.local_addr(), gateway.api_addr(), cluster.port(), &ca, &work.0);
            gateway.run(shutdown).await;
        }
    }
    eprintln!("Stopping PostgreSQL and removing the demo files...");
    tokio::task::spawn_blocking(move || cluster.stop()).await.ok();
    Ok(())
}

fn print_banner(gateway: SocketAddr, api: Option<SocketAddr>, postgres_port: u16, ca: &Path, work: &Path) {
    let (host, port) = (gateway.ip(), gateway.port());
    println!();
    println!("Sluice demo is running.");
    println!();
    println!("  gateway   {gateway}  (TLS with a demo CA; plaintext allowed on loopback)");
    if let Some(api) = api {
        println!(
            "  api       http://{api}  (curl -H 'Authorization: Bearer carol-demo-token' http://{api}/v1/sessions)"
        );
    }
    println!("  database  throwaway PostgreSQL on 127.0.0.1:{postgres_port} with the `shop` demo data");
    println!(
        "  audit     {}  (sluice audit verify --path {0} --key-file {} --head-file {})",
        work.join("audit.db").display(),
        work.join("audit.key").display(),
        work.join("audit.head").display()
    );
    println!();
    println!("Connect as a demo identity: the password is the identity's token.");
    for (name, what) in PEOPLE {
        println!();
        println!("  {name} ({what}):");
        println!("    PGPASSWORD={name}-demo-token psql \"host={host} port={port} dbname=shop user={name}\"");
    }
    println!();
    println!("  With verified TLS:");
    println!(
        "    PGPASSWORD=alice-demo-token psql \"host=localhost port={port} dbname=shop user=alice sslmode=verify-full sslrootcert={}\"",
        ca.display()
    );
    println!();
    println!("Try: SELECT name, email, card_number FROM customers LIMIT 5;   (alice: masked, carol: clear)");
    println!("     DELETE FROM orders WHERE status = 'refunded';              (bob: held until a lead approves)");
    if let Some(api) = api {
        println!("     curl -s -H 'Authorization: Bearer carol-demo-token' http://{api}/v1/approvals");
        println!(
            "     curl -s -X POST -H 'Authorization: Bearer carol-demo-token' http://{api}/v1/approvals/1/approve"
        );
        println!(
            "     SLUICE_TOKEN=bob-demo-token sluice request --api http://{api} --target shop --grant orders-fix --for 30m --reason \"fix orders\""
        );
        println!(
            "                                                                (bob: a time-bound grant; carol approves it the same way)"
        );
    }
    println!("Press ctrl-c to stop; the database and its files are removed.");
}
