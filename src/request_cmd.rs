//! `sluice request`: ask for a time-bound grant through the control API and
//! wait for the approvers' answer.

use std::time::Duration;

use anyhow::Context as _;
use sluice_core::api::AccessRequestBody;
use sluice_core::api::client::ApiClient;
use sluice_core::approvals::{RequestState, RequestView};

pub struct RequestArgs {
    pub api: String,
    pub token: Option<String>,
    pub target: String,
    pub grant: String,
    pub duration: String,
    pub reason: String,
    pub wait: bool,
}

/// How often the request's state is read while waiting.
const POLL: Duration = Duration::from_secs(1);

/// Exits 0 once approved (or, without waiting, once asked); 1 when denied
/// or expired.
pub async fn run(args: RequestArgs) -> anyhow::Result<i32> {
    let token = args
        .token
        .filter(|t| !t.trim().is_empty())
        .context("no token: pass --token or set SLUICE_TOKEN to your Sluice token")?;
    let client = ApiClient::new(&args.api, Some(&token));
    let asked = client
        .request_access(&AccessRequestBody {
            target: args.target.clone(),
            grant: args.grant.clone(),
            duration: args.duration.clone(),
            reason: args.reason.clone(),
        })
        .await
        .context("the gateway did not take the request")?;
    let access = asked.access.as_ref();
    let seconds = access.map_or(0, |a| a.seconds);
    let fresh = asked.created > chrono::Utc::now() - chrono::Duration::seconds(5);
    println!(
        "access request {}{}: grant \"{}\" on {} for {}",
        asked.id,
        if fresh { "" } else { " (already pending)" },
        asked.rule,
        asked.target,
        sluice_core::config::human_duration(Duration::from_secs(seconds)),
    );
    if !args.wait {
        println!(
            "needs {} approval{} from {}; it expires at {} unless decided",
            asked.needed,
            if asked.needed == 1 { "" } else { "s" },
            asked.approvers.join(", "),
            asked.expires.format("%H:%M:%S UTC")
        );
        return Ok(0);
    }
    println!(
        "waiting for {} approval{} from {} (until {}; ctrl-c stops waiting, the request stays open)",
        asked.needed,
        if asked.needed == 1 { "" } else { "s" },
        asked.approvers.join(", "),
        asked.expires.format("%H:%M:%S UTC")
    );
    let mut view = asked;
    while view.state == RequestState::Pending {
        tokio::time::sleep(POLL).await;
        view = client
            .approval(view.id)
            .await
            .with_context(|| format!("reading request {}", view.id))?;
    }
    Ok(report(&view))
}

fn report(view: &RequestView) -> i32 {
    match view.state {
        RequestState::Approved => {
            let by: Vec<&str> = view.approvals.iter().map(|a| a.by.as_str()).collect();
            let until = view
                .access
                .as_ref()
                .and_then(|a| a.until)
                .map(|u| u.format("%H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "its end".into());
            println!(
                "approved by {}: grant \"{}\" holds on {} until {until}",
                by.join(", "),
                view.rule,
                view.target
            );
            0
        }
        RequestState::Denied => {
            println!(
                "denied by {}{}",
                view.denied_by.as_deref().unwrap_or("an approver"),
                view.denial_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            1
        }
        other => {
            println!("request {} {}: nobody decided in time", view.id, other.name());
            1
        }
    }
}
