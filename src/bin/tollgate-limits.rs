//! `tollgate-limits limitador|ratelimit PLUGIN_CONFIG.json`: prints the rate-limit service's
//! limits for the configuration's global budgets (Limitador's limits file, or
//! envoyproxy/ratelimit's configuration), so the plugin configuration stays their one source.
//! Built natively: `cargo run --features cli --bin tollgate-limits -- limitador envoy/tollgate.json`.

use std::process::ExitCode;

use tollgate::config::Config;
use tollgate::global::limits;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(format), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: tollgate-limits limitador|ratelimit PLUGIN_CONFIG.json");
        return ExitCode::from(2);
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) => {
            eprintln!("tollgate-limits: {path}: {err}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_json(&bytes) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tollgate-limits: {path}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let text = match format.as_str() {
        "limitador" => Ok(limits::limitador(&config)),
        "ratelimit" => limits::ratelimit(&config),
        other => Err(format!("unknown format {other:?}: limitador or ratelimit")),
    };
    match text {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("tollgate-limits: {err}");
            ExitCode::FAILURE
        }
    }
}
