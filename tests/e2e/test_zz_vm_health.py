"""Runs last: over the whole suite the filter never trapped, so no VM failed or was reloaded."""


def test_no_vm_failure_or_reload_over_the_suite(envoy):
    stats = envoy.stats("wasm")
    for name in ("wasm.tollgate.vm_reload", "wasm.tollgate.vm_reload_failure", "wasm.tollgate.vm_reload_backoff"):
        assert stats.get(name) == 0, (name, stats)
    log = envoy.log()
    for sign in ("panicked", "Wasm VM failed", "wasm trap", "Function: proxy_on_"):
        assert sign not in log, log[-3000:]
