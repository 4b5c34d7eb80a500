//! A real OpenID provider for the tests: panva's `oidc-provider` (npm),
//! installed from `tests/oidc/package-lock.json` on first use and started
//! with `tests/oidc/provider.mjs` on a loopback port. See that script for
//! its clients and accounts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use tokio::io::{AsyncBufReadExt, BufReader};

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc")
}

/// `npm ci`, once per test binary, when the package is missing or a
/// previous install did not finish; one install at a time across
/// processes (a lock file beside it).
fn install() {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return;
    }
    let dir = oidc_dir();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("sluice-oidc-npm.lock"))
        .expect("the npm install lock");
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; released on drop.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    // npm writes node_modules/.package-lock.json last.
    if !dir.join("node_modules/.package-lock.json").exists() {
        let output = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .output()
            .expect("npm is needed for the OpenID provider (apt-get install npm)");
        assert!(
            output.status.success(),
            "npm ci in {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    drop(lock);
    *installed = true;
}

/// A running provider.
pub struct Provider {
    pub issuer: String,
    port: u16,
    key_file: PathBuf,
    ttl: u64,
    child: tokio::process::Child,
}

impl Provider {
    /// A provider whose ID tokens live `ttl` seconds, with a new key.
    pub async fn start(name: &str, ttl: u64) -> Provider {
        install();
        let key_file = super::cluster().dev.dir().join(format!("oidc-{name}-k1.json"));
        let _ = std::fs::remove_file(&key_file);
        let (child, issuer) = spawn(0, &key_file, "k1", ttl).await;
        let port = issuer.rsplit(':').next().unwrap().parse().unwrap();
        Provider {
            issuer,
            port,
            key_file,
            ttl,
            child,
        }
    }

    /// Restarts on the same port with a new signing key (key id `kid`):
    /// what a provider's key rotation looks like to the gateway.
    pub async fn rotate(&mut self, kid: &str) {
        let _ = self.child.kill().await;
        let stem = self.key_file.file_stem().unwrap().to_string_lossy().into_owned();
        self.key_file = self.key_file.with_file_name(format!("{stem}-{kid}.json"));
        let (child, _) = spawn(self.port, &self.key_file, kid, self.ttl).await;
        self.child = child;
    }
}

async fn spawn(port: u16, key_file: &Path, kid: &str, ttl: u64) -> (tokio::process::Child, String) {
    // node starts the provider in about a second. Once in CI it printed
    // nothing at all for two minutes after loading the package (a hang we
    // could not reproduce): a start that stalls this long is abandoned and
    // made once more, with the first attempt's log kept beside the second.
    const STALLED: std::time::Duration = std::time::Duration::from_secs(30);
    match attempt(port, key_file, kid, ttl, STALLED, "").await {
        Ok(started) => started,
        Err(first) => {
            eprintln!("the OpenID provider stalled; starting it once more. Its log:\n{first}");
            attempt(port, key_file, kid, ttl, super::PATIENCE, &first)
                .await
                .unwrap_or_else(|_| unreachable!("the last attempt fails the test itself"))
        }
    }
}

/// Starts the provider once. A start that prints nothing within `patience`
/// is killed and its log returned when `earlier` is empty (there is another
/// attempt); any other failure fails the test.
async fn attempt(
    port: u16,
    key_file: &Path,
    kid: &str,
    ttl: u64,
    patience: std::time::Duration,
    earlier: &str,
) -> Result<(tokio::process::Child, String), String> {
    // The provider's warnings and errors, kept to explain a failed start.
    let log_file = key_file.with_extension("log");
    let log = std::fs::File::create(&log_file).expect("the OpenID provider's log");
    let started_at = std::time::Instant::now();
    let mut child = tokio::process::Command::new("node")
        .arg("provider.mjs")
        .current_dir(oidc_dir())
        .env("PORT", port.to_string())
        .env("KEY_FILE", key_file)
        .env("KEY_ID", kid)
        .env("ID_TOKEN_TTL", ttl.to_string())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("node is needed for the OpenID provider");
    let failed = |state: String| -> ! {
        let earlier = if earlier.is_empty() {
            String::new()
        } else {
            format!("\nan earlier attempt stalled too; its log:\n{earlier}")
        };
        failed_start(&log_file, format!("{state}{earlier}"))
    };
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = match tokio::time::timeout(patience, lines.next_line()).await {
        Ok(Ok(Some(line))) => line,
        Err(_) if earlier.is_empty() => {
            let _ = child.kill().await;
            let log = std::fs::read_to_string(&log_file).unwrap_or_default();
            return Err(format!("(printed nothing in {:?})\n{log}", started_at.elapsed()));
        }
        Err(_) => failed(format!("it printed nothing in {:?}", started_at.elapsed())),
        Ok(read) => {
            // Its output ends as it exits: wait for the status a moment.
            let exited = tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await;
            failed(match exited {
                Ok(Ok(status)) => format!("it exited ({status})"),
                _ => format!("its output ended ({read:?})"),
            })
        }
    };
    // The provider logs to stdout as it works: keep reading, or it dies of
    // a broken pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let issuer = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|started| Some(started["issuer"].as_str()?.to_string()))
        .unwrap_or_else(|| failed(format!("its first line is not {{\"issuer\": ...}}: {line}")));
    Ok((child, issuer))
}

/// Fails the test: the provider did not start, `state` says how, and its
/// log may say why.
fn failed_start(log_file: &Path, state: String) -> ! {
    panic!(
        "the OpenID provider did not start: {state}; its log ({}):\n{}",
        log_file.display(),
        std::fs::read_to_string(log_file).unwrap_or_default()
    )
}

/// Plays the person at the browser: follows the provider's redirects and
/// forms, signs in as `login` (any password) and consents, up to the
/// redirect to the client, which it then makes (that URL is returned), or
/// up to the device flow's success page (its URL is returned).
pub async fn browse(start: &str, login: &str) -> String {
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // The provider's origin: scheme, host and port of the first URL.
    let origin = {
        let parsed = url::Url::parse(start).unwrap();
        let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{}{port}", parsed.scheme(), parsed.host_str().unwrap())
    };
    let absolute = |to: &str| {
        if to.starts_with("http") {
            to.to_string()
        } else {
            format!("{origin}{to}")
        }
    };
    let mut url = start.to_string();
    let mut form: Option<Vec<(String, String)>> = None;
    for _ in 0..20 {
        let response = match form.take() {
            Some(fields) => browser.post(&url).form(&fields).send().await.unwrap(),
            None => browser.get(&url).send().await.unwrap(),
        };
        if response.status().is_redirection() {
            let to = absolute(response.headers()["location"].to_str().unwrap());
            if !to.starts_with(&origin) {
                // Back to the client: the browser goes there.
                let _ = browser.get(&to).send().await;
                return to;
            }
            url = to;
            continue;
        }
        let status = response.status();
        let page = response.text().await.unwrap();
        assert!(status.is_success(), "{url}: {status}\n{page}");
        if page.contains("Sign-in Success") {
            return url;
        }
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        form = Some(if page.contains("name=\"login\"") {
            vec![pair("prompt", "login"), pair("login", login), pair("password", "any")]
        } else if page.contains("name=\"prompt\" value=\"consent\"") {
            vec![pair("prompt", "consent")]
        } else {
            // Any other form (the device flow's code and confirmation, an
            // auto-submitting callback): its fields, to its action.
            let (action, fields) = form_of(&page).unwrap_or_else(|| panic!("{url}: no form\n{page}"));
            url = absolute(&action);
            fields
        });
    }
    panic!("the sign-in did not come back to the client");
}

/// The first form of a page: its action and the values of its inputs.
fn form_of(page: &str) -> Option<(String, Vec<(String, String)>)> {
    let attribute = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
        Some(tag[start..start + tag[start..].find('"')?].to_string())
    };
    let form_at = page.find("<form")?;
    let form_tag = &page[form_at..form_at + page[form_at..].find('>')?];
    let action = attribute(form_tag, "action")?;
    let mut fields = Vec::new();
    let mut rest = &page[form_at..page[form_at..].find("</form>").map_or(page.len(), |e| form_at + e)];
    while let Some(at) = rest.find("<input") {
        let tag = &rest[at..at + rest[at..].find('>').unwrap_or(rest.len() - at)];
        if let (Some(name), Some(value)) = (attribute(tag, "name"), attribute(tag, "value")) {
            fields.push((name, value));
        }
        rest = &rest[at + tag.len()..];
    }
    Some((action, fields))
}
