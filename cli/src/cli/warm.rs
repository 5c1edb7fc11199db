//! `image-cache warm`: ask a running server (`POST /v2/cache/warm`) to
//! fill images before they are needed, on itself or fanned out to a set of
//! nodes; follow its progress (`GET /v2/cache/warm/{id}`) and print the
//! final report.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::{Failure, Settings, outln};

#[derive(Args, Debug, Clone)]
pub struct WarmArgs {
    /// The image ids to warm (or --top, or --property).
    ids: Vec<String>,

    /// The N most-hit images of the last --days across the --node's (this
    /// server's own cache when no node is given).
    #[arg(long, value_name = "N", conflicts_with_all = ["ids", "property"])]
    top: Option<u64>,

    /// The window of --top, in days.
    #[arg(long, value_name = "DAYS", default_value_t = 7.0, requires = "top")]
    days: f64,

    /// The images of the server's Glance upstream whose property NAME is
    /// VALUE.
    #[arg(long, value_name = "NAME=VALUE", conflicts_with = "ids")]
    property: Option<String>,

    /// A node to warm (its URL, e.g. http://cache-2:9292); repeatable. The
    /// server asks each one with the same token and collects their reports.
    /// None: the server warms itself.
    #[arg(long = "node", value_name = "URL")]
    nodes: Vec<String>,

    /// Images filled at once on each node.
    #[arg(long, value_name = "N", default_value_t = 4)]
    concurrency: u64,

    /// The server (default: http://bind_host:bind_port, or
    /// http://127.0.0.1:9292).
    #[arg(long, value_name = "URL")]
    server: Option<String>,

    /// File holding the server's admin token (else IMAGE_CACHE_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
}

/// `image-cache warm`.
pub fn run(settings: &Settings, args: &WarmArgs) -> Result<(), Failure> {
    let server = args
        .server
        .clone()
        .unwrap_or_else(|| {
            let host = settings.bind_host.as_deref().unwrap_or("127.0.0.1");
            let port = settings.bind_port.unwrap_or(9292);
            format!("http://{host}:{port}")
        })
        .trim_end_matches('/')
        .to_string();
    let token = super::serve::secret(args.admin_token_file.as_ref(), "IMAGE_CACHE_ADMIN_TOKEN")?
        .ok_or_else(|| {
            Failure::Usage(
                "warming needs the server's admin token: --admin-token-file or IMAGE_CACHE_ADMIN_TOKEN"
                    .into(),
            )
        })?;
    let mut body = json!({"concurrency": args.concurrency});
    if let Some(n) = args.top {
        body["top"] = json!({"count": n, "days": args.days});
    } else if let Some(p) = &args.property {
        let (name, value) = p
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("--property {p:?}: give NAME=VALUE")))?;
        body["property"] = json!({"name": name, "value": value});
    } else if !args.ids.is_empty() {
        body["images"] = json!(args.ids);
    } else {
        return Err(Failure::Usage(
            "name the images: ids, --top N or --property NAME=VALUE".into(),
        ));
    }
    if !args.nodes.is_empty() {
        body["nodes"] = json!(args.nodes);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::op("io", format!("starting the network runtime: {e}")))?;
    let report = runtime.block_on(follow(&server, token.expose(), body, settings.json))?;
    let mut out = std::io::stdout().lock();
    if settings.json {
        let text = serde_json::to_string_pretty(&report).expect("JSON values serialize");
        outln!(out, "{text}");
    } else {
        let n = |k: &str| report[k].as_u64().unwrap_or(0);
        outln!(
            out,
            "warmed {} images in {:.1} s: {} cached, {} already cached, {} not kept, {} failed",
            n("images"),
            report["seconds"].as_f64().unwrap_or(0.0),
            n("cached"),
            n("already_cached"),
            n("not_cached"),
            n("failed")
        );
        for node in report["nodes"].as_array().into_iter().flatten() {
            let r = &node["report"];
            outln!(
                out,
                "  {}: {}",
                node["node"].as_str().unwrap_or("?"),
                match node["error"].as_str() {
                    Some(e) => format!("failed: {e}"),
                    None => format!(
                        "{} cached, {} already cached, {} failed",
                        r["cached"], r["already_cached"], r["failed"]
                    ),
                }
            );
        }
        for e in report["errors"].as_array().into_iter().flatten() {
            outln!(
                out,
                "  {}: {}",
                e["image_id"].as_str().unwrap_or("?"),
                e["error"].as_str().unwrap_or("?")
            );
        }
    }
    if report["failed"].as_u64().unwrap_or(0) > 0 {
        return Err(Failure::Reported(format!(
            "{} of {} images could not be warmed",
            report["failed"], report["images"]
        )));
    }
    Ok(())
}

/// Start the warming, print its progress on stderr, return the report.
async fn follow(server: &str, token: &str, body: Value, quiet: bool) -> Result<Value, Failure> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::op("io", e.to_string()))?;
    let failed = |e: reqwest::Error| Failure::op("source", format!("{server}: {e}"));
    let answer = client
        .post(format!("{server}/v2/cache/warm"))
        .header("x-auth-token", token)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(failed)?;
    let status = answer.status();
    let started: Value = read(answer).await?;
    if !status.is_success() {
        let message = started["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| started.to_string());
        return Err(Failure::op(
            "source",
            format!("{server} answered {status}: {message}"),
        ));
    }
    let id = started["warm"].as_u64().unwrap_or(0);
    let mut last = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answer = client
            .get(format!("{server}/v2/cache/warm/{id}"))
            .header("x-auth-token", token)
            .send()
            .await
            .map_err(failed)?;
        let report = read(answer).await?;
        let line = format!(
            "warming {id}: {}/{} done, {} failed",
            report["done"], report["images"], report["failed"]
        );
        if !quiet && line != last {
            let _ = writeln!(std::io::stderr(), "{line}");
            last = line;
        }
        if report["state"] == "done" {
            return Ok(report);
        }
    }
}

async fn read(answer: reqwest::Response) -> Result<Value, Failure> {
    let bytes = answer
        .bytes()
        .await
        .map_err(|e| Failure::op("source", e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::op("source", format!("the server's answer is not JSON: {e}")))
}
