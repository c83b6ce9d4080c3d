//! `keyway-instance CONFIG`: runs one keyway server from a config file until killed.
//! The coordination tests start several and SIGKILL them; the library's `Server` is the
//! whole of keyway but the command-line parsing.

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(path) = std::env::args_os().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: keyway-instance CONFIG");
        std::process::exit(2);
    };
    keyway_proxy::telemetry::init_logs(false);
    let config = match keyway::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            std::process::exit(2);
        }
    };
    let server = match keyway::Server::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("keyway-instance: {e}");
            std::process::exit(1);
        }
    };
    server.set_config_source(path);
    // Tell the test where we listen: one line on stdout.
    println!(
        "listening {} admin {}",
        server.listen_addrs()[0],
        server
            .admin_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    let _ = tokio::signal::ctrl_c().await;
    server.shutdown().await;
}
