//! `keyway ctl`: the operator's client of a running keyway's admin API (as `patronictl`
//! or HAProxy's runtime API): status, drain, undrain, promote, failback, reload, state
//! export. It talks HTTP to the admin listener only and never reads or writes the state
//! file or etcd itself; the config file, when one is found, only tells it where the
//! admin listener is and where its token is.
//!
//! Exit status: 0 done, 1 refused by keyway (a 4xx answer), 2 usage error, 3 the admin
//! API cannot be reached or failed (5xx). Output: a human table or sentence, or with
//! `--json` the server's JSON unchanged.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

mod table;

/// The admin URL when neither `--admin`, `KEYWAY_ADMIN` nor a config says one
/// (`[admin] listen` in the documentation's examples).
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:9900";

/// How long one call may take (a drain waits for a running switchover up to 30 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(40);

/// `keyway ctl` options.
#[derive(Args)]
pub struct Ctl {
    /// Admin API URL (default: KEYWAY_ADMIN, else [admin] listen of --config or
    /// KEYWAY_CONFIG, else http://127.0.0.1:9900).
    #[arg(long, global = true)]
    admin: Option<String>,
    /// File holding the admin token (default: KEYWAY_ADMIN_TOKEN, else the config's
    /// [admin] token_file).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// A keyway config file, read only for its [admin] listen and token_file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Print the server's JSON unchanged, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Clusters, backends, health, roles and drains.
    Status,
    /// Stop new sessions to a backend; pinned sessions keep it until they end or the
    /// deadline passes.
    Drain {
        cluster: String,
        backend: String,
        /// After this long (e.g. 10m, 1h30m) pinned sessions move too.
        #[arg(long)]
        deadline: Option<String>,
    },
    /// Let a drained backend take new sessions again.
    Undrain { cluster: String, backend: String },
    /// Make a backend the primary of a primary-replica cluster (planned switchover).
    Promote { cluster: String, backend: String },
    /// Return a primary-replica cluster to its configured primary.
    Failback { cluster: String },
    /// Re-read the config file (build, validate, swap; a bad file changes nothing).
    Reload,
    /// Decisions kept in the state file or etcd.
    State {
        #[command(subcommand)]
        command: CtlState,
    },
}

#[derive(Subcommand)]
enum CtlState {
    /// Print every decision (topologies, drains) as JSON, as `keyway state export` does.
    Export,
}

/// What went wrong, with the exit status it means.
struct Failure {
    code: u8,
    message: String,
}

fn failure(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// Runs `keyway ctl`.
pub fn run(ctl: Ctl) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyway ctl: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(call(&ctl)) {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("keyway ctl: {}", f.message.trim_end());
            ExitCode::from(f.code)
        }
    }
}

async fn call(ctl: &Ctl) -> Result<String, Failure> {
    let target = Target::find(ctl)?;
    let path_seg = |s: &str| -> Result<String, Failure> {
        if s.is_empty() || s.contains(['/', '?', '#', '%', ' ']) {
            return Err(failure(
                2,
                format!("`{s}` is not a cluster or backend name"),
            ));
        }
        Ok(s.to_string())
    };
    let (method, path) = match &ctl.command {
        CtlCommand::Status => (Method::GET, "/status".to_string()),
        CtlCommand::Drain {
            cluster,
            backend,
            deadline,
        } => {
            let mut p = format!(
                "/clusters/{}/backends/{}/drain",
                path_seg(cluster)?,
                path_seg(backend)?
            );
            if let Some(d) = deadline {
                humantime::parse_duration(d).map_err(|e| {
                    failure(
                        2,
                        format!("--deadline {d}: {e}; write it like 600s, 10m or 1h30m"),
                    )
                })?;
                p.push_str(&format!("?deadline={d}"));
            }
            (Method::POST, p)
        }
        CtlCommand::Undrain { cluster, backend } => (
            Method::POST,
            format!(
                "/clusters/{}/backends/{}/undrain",
                path_seg(cluster)?,
                path_seg(backend)?
            ),
        ),
        CtlCommand::Promote { cluster, backend } => (
            Method::POST,
            format!(
                "/clusters/{}/promote/{}",
                path_seg(cluster)?,
                path_seg(backend)?
            ),
        ),
        CtlCommand::Failback { cluster } => (
            Method::POST,
            format!("/clusters/{}/failback", path_seg(cluster)?),
        ),
        CtlCommand::Reload => (Method::POST, "/reload".to_string()),
        CtlCommand::State {
            command: CtlState::Export,
        } => (Method::GET, "/state".to_string()),
    };
    let (status, body) = target.send(method, &path).await?;
    if status == StatusCode::UNAUTHORIZED {
        return Err(failure(
            1,
            format!("keyway refused the call: no or wrong admin token. Pass --token-file FILE (the content of [admin] token_file) or set KEYWAY_ADMIN_TOKEN\n({})", body.trim()),
        ));
    }
    if status.is_client_error() {
        return Err(failure(1, format!("refused ({status}): {body}")));
    }
    if !status.is_success() {
        return Err(failure(3, format!("keyway failed ({status}): {body}")));
    }
    if ctl.json {
        return Ok(match &ctl.command {
            // The one answer that is not JSON.
            CtlCommand::Reload => {
                serde_json::json!({ "reloaded": true, "message": body.trim() }).to_string()
            }
            _ => body,
        });
    }
    let json = || {
        serde_json::from_str::<serde_json::Value>(&body)
            .map_err(|e| failure(3, format!("the admin API answered no JSON ({e}): {body}")))
    };
    Ok(match &ctl.command {
        CtlCommand::Status => table::status(&json()?),
        CtlCommand::Drain { .. } | CtlCommand::Undrain { .. } => table::drain(&json()?),
        CtlCommand::Promote { cluster, .. } | CtlCommand::Failback { cluster } => {
            table::topology(cluster, &json()?)
        }
        CtlCommand::Reload => body,
        CtlCommand::State { .. } => serde_json::to_string_pretty(&json()?).unwrap_or(body),
    })
}

/// The admin API to call and the token to show it.
struct Target {
    uri: Uri,
    token: Option<String>,
}

impl Target {
    fn find(ctl: &Ctl) -> Result<Self, Failure> {
        let config = ctl
            .config
            .clone()
            .or_else(|| std::env::var_os("KEYWAY_CONFIG").map(PathBuf::from));
        let from_config = config.as_deref().map(admin_of_config).transpose()?;
        let url = ctl
            .admin
            .clone()
            .or_else(|| std::env::var("KEYWAY_ADMIN").ok())
            .or_else(|| from_config.as_ref().and_then(|c| c.0.clone()))
            .unwrap_or_else(|| DEFAULT_ADMIN_URL.to_string());
        let uri: Uri = url
            .parse()
            .ok()
            .filter(|u: &Uri| u.scheme_str() == Some("http") && u.authority().is_some())
            .ok_or_else(|| {
                failure(2, format!("--admin {url}: write it as http://HOST:PORT (the admin listener speaks plain HTTP)"))
            })?;
        let token_file = ctl
            .token_file
            .clone()
            .or_else(|| from_config.and_then(|c| c.1));
        let token = match (&ctl.token_file, std::env::var("KEYWAY_ADMIN_TOKEN")) {
            (None, Ok(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            _ => match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f)
                        .map_err(|e| {
                            failure(
                                2,
                                format!("cannot read the token file {}: {e}", f.display()),
                            )
                        })?
                        .trim()
                        .to_string(),
                ),
                None => None,
            },
        };
        Ok(Self { uri, token })
    }

    async fn send(&self, method: Method, path: &str) -> Result<(StatusCode, String), Failure> {
        let authority = self.uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let unreachable = |e: String| {
            failure(
                3,
                format!("cannot reach the admin API at {} ({e}). Is keyway running, and is this its [admin] listen? Pass --admin http://HOST:PORT or --config FILE", self.uri),
            )
        };
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(authority)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, authority);
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
            if let Ok(user) = std::env::var("USER") {
                req = req.header(keyway::admin::OPERATOR_HEADER, user);
            }
            let req = req
                .body(Full::new(Bytes::new()))
                .map_err(|e| failure(2, e.to_string()))?;
            let resp = tx
                .send_request(req)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {CALL_TIMEOUT:?}")))?
    }
}

/// `[admin] listen` (as a URL) and `token_file` (resolved against the config's folder)
/// of a config file, read as plain TOML: nothing else of it is checked.
fn admin_of_config(path: &Path) -> Result<(Option<String>, Option<PathBuf>), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| failure(2, format!("cannot read {}: {e}", path.display())))?;
    let doc: toml::Table = text
        .parse()
        .map_err(|e| failure(2, format!("{} is not TOML: {e}", path.display())))?;
    let admin = doc.get("admin").and_then(|a| a.as_table());
    let listen = admin
        .and_then(|a| a.get("listen"))
        .and_then(|l| l.as_str())
        .map(|l| {
            // A wildcard listener is reached on loopback.
            let l = l
                .replace("0.0.0.0:", "127.0.0.1:")
                .replace("[::]:", "[::1]:");
            format!("http://{l}")
        });
    let base = path.parent().unwrap_or(Path::new("."));
    let token = admin
        .and_then(|a| a.get("token_file"))
        .and_then(|t| t.as_str())
        .map(|t| base.join(t));
    Ok((listen, token))
}
