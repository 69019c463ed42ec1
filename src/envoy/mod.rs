//! The skin: the only modules that name `proxy_wasm`. `root` parses the configuration once,
//! `http` turns Envoy's callbacks into calls on the host-free core and applies what it decides,
//! `host` wraps every host call and maps its status, so no SDK helper that unwraps is reachable.

#[cfg(feature = "bench-count")]
mod count;
mod host;
mod http;
mod metrics;
mod root;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    // Installs the SDK's logger and a panic hook that logs at critical level before the trap.
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| Box::new(root::TollgateRoot::default()));
}}
