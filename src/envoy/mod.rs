//! The skin: the only modules that name `proxy_wasm`. `root` parses the configuration once,
//! `http` turns Envoy's callbacks into calls on the host-free core and applies what it decides,
//! `host` wraps every host call and maps its status, so no SDK helper that unwraps is reachable.

mod host;
mod http;
mod metrics;
mod root;

// Bench builds (`bench-count`, never shipped) count every host call and allocation: `make bench`.
#[cfg(feature = "bench-count")]
use benchcount::counted as hostcalls;
#[cfg(feature = "bench-count")]
#[global_allocator]
static ALLOCATOR: benchcount::Counting = benchcount::Counting;
#[cfg(not(feature = "bench-count"))]
use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    // Installs the SDK's logger and a panic hook that logs at critical level before the trap.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| Box::new(root::TollgateRoot::new(id)));
}}
